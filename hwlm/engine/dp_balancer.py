"""Which engine core a new request goes to (``--data-parallel-size``), as vLLM's data-parallel
load balancing chooses, plus a preference for the core that holds the prompt's prefix.

A core's load is what it last reported (``EngineStats``: waiting requests plus running
sequences) plus the sequences this API process has sent it since that report; ties go to the
lower KV-cache usage, then round-robin, so that an idle server spreads requests too. Every core
broadcasts its stats to every API process, so with ``--api-server-count`` each sees the others'
traffic as soon as the cores report it (every 0.1 s while busy).

Prefix-aware routing (``prefix_aware``): a prompt whose leading blocks were recently sent to a
core (``PrefixIndex``) goes there, while that core's load is within ``PREFIX_LOAD_SLACK``
sequences of the least loaded core's; beyond that, balance wins (a popular prefix must not pile
all traffic onto one core).
"""

from __future__ import annotations

from collections.abc import Sequence

from hwlm.engine.dp_prefix import PrefixIndex
from hwlm.engine.messages import EngineStats

PREFIX_LOAD_SLACK = 8  # sequences more than the least loaded core a prefix hit may cost


class DataParallelBalancer:
    def __init__(
        self,
        count: int,
        block_size: int,
        capacities: Sequence[int],
        *,
        prefix_aware: bool = True,
    ) -> None:
        self.count = count
        self.prefix = PrefixIndex(count, block_size, capacities) if prefix_aware else None
        self._reports: list[EngineStats | None] = [None] * count
        self._sent_since = [0] * count  # sequences sent since the core's last report
        self._next = 0  # where round-robin among equals starts
        self._hashed: tuple[Sequence[int], list[int]] | None = None  # the last prompt's blocks

    def choose(self, stats: Sequence[EngineStats], prompt_token_ids: Sequence[int]) -> int:
        """The core for a new request, given each core's latest stats (the same object until
        a new report replaces it). Call ``sent`` once it is sent."""
        loads = [self._load(core, s) for core, s in enumerate(stats)]
        order = [(self._next + i) % self.count for i in range(self.count)]
        least = min(order, key=lambda core: loads[core])
        if self.prefix is None:
            return least
        hashes = self._block_hashes(self.prefix, prompt_token_ids)
        if not hashes:
            return least
        matched = self.prefix.matched_blocks(hashes)
        best = max(order, key=lambda core: (matched[core], -loads[core][0]))
        if matched[best] and loads[best][0] <= loads[least][0] + PREFIX_LOAD_SLACK:
            return best
        return least

    def sent(self, core: int, num_seqs: int, prompt_token_ids: Sequence[int]) -> None:
        """A request of ``num_seqs`` sequences went to ``core``."""
        self._sent_since[core] += num_seqs
        self._next = (core + 1) % self.count
        if self.prefix is not None:
            self.prefix.remember(core, self._block_hashes(self.prefix, prompt_token_ids))
        self._hashed = None

    def _block_hashes(self, prefix: PrefixIndex, prompt_token_ids: Sequence[int]) -> list[int]:
        """The prompt's block hashes, computed once for ``choose`` and ``sent`` of one request."""
        if self._hashed is None or self._hashed[0] is not prompt_token_ids:
            self._hashed = (prompt_token_ids, prefix.block_hashes(prompt_token_ids))
        return self._hashed[1]

    def _load(self, core: int, stats: EngineStats) -> tuple[int, float]:
        if stats is not self._reports[core]:  # a new report counts what was sent before it
            self._reports[core] = stats
            self._sent_since[core] = 0
        queued = stats.num_waiting + stats.num_running_seqs + self._sent_since[core]
        return queued, stats.kv_cache_usage
