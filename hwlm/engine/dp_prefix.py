"""Which engine core probably holds a prompt's prefix in its KV cache (``--data-parallel-size``).

The API process cannot see the cores' prefix caches, but it knows what it sent where: for each
core, ``PrefixIndex`` remembers the hashes of the full prompt blocks it sent there most recently
(each block's hash chained to the one before it, as the block manager hashes them, so one hash
stands for the whole prefix up to its block). A new prompt's longest run of known leading blocks
on a core estimates what that core's cache can reuse. The memory is bounded per core by the
core's KV-cache size in blocks (least recently sent forgotten first), so it forgets roughly when
the core's cache must have evicted; it can still be wrong (the core evicts under load, other API
processes send prompts it does not see), which costs a cache miss, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    def __init__(self, count: int, block_size: int, capacities: Sequence[int]) -> None:
        self.block_size = block_size
        self._capacities = [max(1, c) for c in capacities]
        self._seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(count)]

    def block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """The chained hash of each full block of ``token_ids``."""
        size = self.block_size
        hashes: list[int] = []
        previous = 0
        for start in range(0, len(token_ids) - size + 1, size):
            previous = hash((previous, tuple(token_ids[start : start + size])))
            hashes.append(previous)
        return hashes

    def matched_blocks(self, hashes: Sequence[int]) -> list[int]:
        """Per core, how many leading blocks of the prompt it was sent recently."""
        return [_leading(seen, hashes) for seen in self._seen]

    def remember(self, core: int, hashes: Sequence[int]) -> None:
        """``core`` was sent a prompt with these blocks: they are now its most recent, the
        first block most of all (a prefix outlives its tails, as in the block manager)."""
        seen = self._seen[core]
        for h in reversed(hashes):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self._capacities[core]:
            seen.popitem(last=False)


def _leading(seen: OrderedDict[int, None], hashes: Sequence[int]) -> int:
    """The length of the run of ``hashes``, from the first, that ``seen`` holds."""
    for i, h in enumerate(hashes):
        if h not in seen:
            return i
    return len(hashes)
