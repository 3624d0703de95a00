"""Maps each sequence's tokens to physical KV-cache blocks.

- Reference counts: a block may be shared (a cached prefix, a forked sequence); it returns to
  the free list when its count reaches zero.
- Copy-on-write: before a sequence writes into a block it shares, it gets a private copy; the
  (src, dst) pairs wait in ``pending_copies`` for the engine to hand to the backend.
- Automatic prefix caching: once a full block's keys/values are computed, its hash (chained to
  the hash of the block before it, so equal hashes mean equal prefixes) is registered; a new
  sequence whose prompt starts with the same tokens reuses those blocks. Token ids are compared on
  every hit, so a hash collision can never serve wrong KV.
- Free blocks that still hold cached content stay findable until reused, least recently freed
  first; a sequence's blocks are freed tail first so shared prefixes stay cached longest.
"""

from __future__ import annotations

from collections import OrderedDict

from hwlm.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the first is reused first.
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of which were found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # Prefix cache -----------------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Block ids and hashes of the longest cached prefix of ``seq`` (read-only).

        At least one token is always left to compute, so the model can produce logits. A
        sequence that still wants prompt logprobs reads nothing: its prompt must be computed."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return [], []
        bs = self.block_size
        ids: list[int] = []
        hashes: list[int] = []
        parent: int | None = None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the full, computed blocks of ``seq`` that are not registered yet."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # With a step in flight, computed positions may run one past the known token ids.
        computed = min(seq.num_computed_tokens, seq.num_tokens)
        num_full = min(computed // bs, len(seq.block_ids))
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(parent, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_ids[i]]
            if h in self.hash_to_block or block.hash is not None:
                continue  # the same content is cached in another block already
            block.hash, block.token_ids = h, tokens
            self.hash_to_block[h] = block.block_id

    # Allocation -------------------------------------------------------------------------------

    def allocate_slots(
        self,
        seq: Sequence,
        num_new_tokens: int,
        cached_blocks: tuple[list[int], list[int]] | None = None,
    ) -> bool:
        """Make room for tokens ``[num_computed, num_computed + num_new_tokens)`` of ``seq``.

        ``cached_blocks`` (from ``find_cached_prefix``) is taken over first, for a sequence that
        holds no blocks yet. Returns False, changing nothing, when too few blocks are free."""
        if not cached_blocks and self._fits_in_own_blocks(seq, num_new_tokens):
            return True  # the common decode step: nothing to allocate or copy
        hit_ids, hit_hashes = cached_blocks or ([], [])
        start = len(hit_ids) * self.block_size if hit_ids else seq.num_computed_tokens
        end = start + num_new_tokens
        held = len(seq.block_ids) + len(hit_ids)
        num_needed = max(0, -(-end // self.block_size) - held)
        num_needed += self._count_shared_to_write(seq, start, end)
        revived = sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        if num_needed > self.num_free_blocks - revived:
            return False
        if hit_ids or seq.num_computed_tokens == 0:
            self._count_prefix_lookup(seq, len(hit_ids))
        for block_id in hit_ids:
            self._take(block_id)
        seq.block_ids.extend(hit_ids)
        seq.block_hashes.extend(hit_hashes)
        if hit_ids:
            seq.num_computed_tokens = seq.num_cached_tokens = start
        self._copy_shared_blocks_to_write(seq, start, end)
        while len(seq.block_ids) * self.block_size < end:
            seq.block_ids.append(self._allocate_fresh())
        return True

    def _fits_in_own_blocks(self, seq: Sequence, num_new_tokens: int) -> bool:
        """The new tokens land in one block that ``seq`` already holds alone."""
        start = seq.num_computed_tokens
        if start == 0 or num_new_tokens < 1:
            return False
        index = start // self.block_size
        return (start + num_new_tokens - 1) // self.block_size == index < len(
            seq.block_ids
        ) and self.blocks[seq.block_ids[index]].ref_count == 1

    def _count_prefix_lookup(self, seq: Sequence, num_hit_blocks: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += num_hit_blocks * self.block_size

    def _written_block_indices(self, seq: Sequence, start: int, end: int) -> range:
        first = start // self.block_size
        last = min(-(-end // self.block_size), len(seq.block_ids))
        return range(first, last)

    def _count_shared_to_write(self, seq: Sequence, start: int, end: int) -> int:
        return sum(
            1
            for i in self._written_block_indices(seq, start, end)
            if self.blocks[seq.block_ids[i]].ref_count > 1
        )

    def _copy_shared_blocks_to_write(self, seq: Sequence, start: int, end: int) -> None:
        for i in self._written_block_indices(seq, start, end):
            old = self.blocks[seq.block_ids[i]]
            if old.ref_count > 1:
                new_id = self._allocate_fresh()
                self.pending_copies.append((old.block_id, new_id))
                old.ref_count -= 1
                seq.block_ids[i] = new_id
                del seq.block_hashes[i:]  # hashes past a rewritten block no longer describe it

    def _allocate_fresh(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    # Release and sharing ----------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``, tail first."""
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
                if block.hash is None:  # nothing worth keeping: reuse it first
                    self.free_ids.move_to_end(block_id, last=False)
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share all of ``parent``'s blocks (copied on first write)."""
        for block_id in parent.block_ids:
            self.blocks[block_id].ref_count += 1
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks; only when no block is in use (False, and nothing done, if
        some are), as vLLM's reset_prefix_cache."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block.clear()
        return True

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check_invariants(self, live: list[Sequence]) -> None:
        """Raise AssertionError if reference counts or the free list disagree with ``live``."""
        expected = [0] * self.num_blocks
        for seq in live:
            assert len(set(seq.block_ids)) == len(seq.block_ids), f"{seq} holds a block twice"
            for block_id in seq.block_ids:
                expected[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == expected[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count}, held {expected[block.block_id]}"
            )
            assert (block.ref_count == 0) == (block.block_id in self.free_ids), (
                f"block {block.block_id}: ref_count {block.ref_count} but free={block.block_id in self.free_ids}"
            )
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h, f"hash table points at block {block_id} wrongly"
