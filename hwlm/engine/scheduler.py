"""Continuous batching: which sequences run this step, and how many tokens each.

One policy covers prefill, chunked prefill and decode, as in vLLM's v1 scheduler: every running
sequence has ``num_tokens - num_computed_tokens`` tokens still to process (one, for a decode).
Each step fills a token budget (``max_num_batched_tokens``), running sequences first in arrival
order, then waiting ones, first come first served. A prompt longer than what is left of the budget
is cut into chunks over several steps. When the KV cache runs out, the most recently arrived
running sequence is preempted: its blocks are freed and it is recomputed later (its cached prefix
blocks usually survive, so resuming is cheap).

With overlapped steps (``hwlm.engine.llm_engine``) a sequence may have a token in flight: sampled by the step
still running on the device. It counts as known here (``num_tokens_with_pending``), so the next
step computes it; a sequence that the token in flight will end by length is left out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hwlm.config import EngineConfig
from hwlm.engine.block_manager import BlockManager
from hwlm.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens to compute, per sequence
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence that already holds its blocks (a parallel-sampling fork)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = self._schedule_running(batch, budget)
        budget -= batch.total_tokens
        if not preempted:
            self._schedule_waiting(batch, budget)
        batch.copies = self.block_manager.take_pending_copies()
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.stops_by_length_when_pending_lands(self.config.max_model_len):
                i += 1  # finishes once its token in flight lands: nothing more to compute
                continue
            num_new = min(seq.num_tokens_with_pending - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                preempted = True
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
        return preempted

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.find_cached_prefix(seq)
            num_cached = len(cached[0]) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate_slots(seq, num_new, cached):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished sequence and free its blocks."""
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop every sequence of a request, wherever it is; returns them."""
        dropped = [s for s in self.running if s.request_id == request_id]
        for seq in dropped:
            self.finish(seq)
        waiting = [s for s in self.waiting if s.request_id == request_id]
        for seq in waiting:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
        return dropped + waiting
