"""BlockManager invariants under long random operation sequences, and its caching rules."""

from __future__ import annotations

import random

import pytest

from hwlm.engine.block_manager import BlockManager
from hwlm.engine.sequence import Sequence
from hwlm.sampling_params import SamplingParams

PARAMS = SamplingParams()


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, str(seq_id), tokens, PARAMS)


def compute(bm: BlockManager, seq: Sequence, cached: bool = True) -> bool:
    """Allocate and 'compute' all of seq's pending tokens, as one engine step would."""
    hits = bm.find_cached_prefix(seq) if cached and not seq.block_ids else None
    start = len(hits[0]) * bm.block_size if hits else seq.num_computed_tokens
    if not bm.allocate_slots(seq, seq.num_tokens - start, hits):
        return False
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)
    return True


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_invariants(block_size: int, seed: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=64, block_size=block_size, enable_prefix_caching=True)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 40))] for _ in range(4)]
    live: list[Sequence] = []
    next_id = 0
    for _ in range(1500):
        op = rng.random()
        if op < 0.3 or not live:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            seq = make_seq(next_id, tokens)
            next_id += 1
            if compute(bm, seq):
                live.append(seq)
            else:
                assert seq.block_ids == [] and seq.num_computed_tokens == 0
        elif op < 0.65:
            seq = rng.choice(live)
            seq.token_ids.append(rng.randrange(50))
            before = {b: bm.blocks[b].ref_count for b in seq.block_ids}
            written = seq.num_computed_tokens // block_size
            shared = written < len(seq.block_ids) and before[seq.block_ids[written]] > 1
            old_ids = list(seq.block_ids)
            if not compute(bm, seq):
                seq.token_ids.pop()
                continue
            copies = bm.take_pending_copies()
            # copy-on-write happens exactly when the block written into was shared
            assert len(copies) == (1 if shared else 0)
            if shared:
                assert copies[0][0] == old_ids[written] and copies[0][1] == seq.block_ids[written]
            else:
                assert seq.block_ids[: len(old_ids)] == old_ids
        elif op < 0.8:
            parent = rng.choice(live)
            child = make_seq(next_id, list(parent.token_ids))
            next_id += 1
            bm.fork(parent, child)
            live.append(child)
        else:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        bm.check_invariants(live)
    for seq in live:
        bm.free(seq)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_hit_reuses_blocks_and_counts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = make_seq(0, list(range(10)))
    assert compute(bm, a)
    b = make_seq(1, list(range(8)) + [99, 98, 97])
    assert compute(bm, b)
    assert b.block_ids[:2] == a.block_ids[:2]  # two full blocks shared
    assert b.num_cached_tokens == 8
    assert bm.prefix_hit_tokens == 8 and bm.prefix_query_tokens == 21
    bm.free(a)
    bm.free(b)
    c = make_seq(2, list(range(9)))  # cached blocks survive being freed
    assert compute(bm, c)
    assert c.num_cached_tokens == 8
    bm.check_invariants([c])


def test_full_prompt_hit_leaves_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_seq(0, list(range(8)))
    assert compute(bm, a)
    ids, _ = bm.find_cached_prefix(make_seq(1, list(range(8))))
    assert len(ids) == 1  # the second block would leave nothing to compute


def test_hash_collision_is_caught_by_token_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    import hwlm.engine.block_manager as module

    monkeypatch.setattr(module, "chain_hash", lambda parent, tokens: 7)  # everything collides
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = make_seq(0, [1, 2, 3])
    assert compute(bm, a)
    ids, _ = bm.find_cached_prefix(make_seq(1, [5, 6, 7]))
    assert ids == []


def test_lru_eviction_prefers_uncached_then_tail_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = make_seq(0, [1, 2, 3, 4, 5])  # blocks [1,2] and [3,4] get cached, [5] does not
    assert compute(bm, a)
    first, second, tail = a.block_ids
    bm.free(a)
    b = make_seq(1, [9])
    assert compute(bm, b, cached=False)
    assert b.block_ids == [tail]  # an uncached block is reused before any cached one
    assert bm.find_cached_prefix(make_seq(2, [1, 2, 3, 4, 0]))[0] == [first, second]
    c = make_seq(3, [8, 8, 8])  # needs two blocks: the never-used one, then an eviction
    assert compute(bm, c, cached=False)
    assert second in c.block_ids and first not in c.block_ids  # tail of the prefix goes first
    assert bm.find_cached_prefix(make_seq(4, [1, 2, 3, 4, 0]))[0] == [first]
    bm.check_invariants([b, c])


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=False)
    seq = make_seq(0, [1, 2, 3, 4, 5])
    assert not bm.allocate_slots(seq, 5)
    assert seq.block_ids == [] and bm.num_free_blocks == 2
    bm.check_invariants([])


def test_invalid_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0, enable_prefix_caching=True)


def test_reset_prefix_cache_only_when_idle() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = make_seq(0, [1, 2, 3, 4, 5])
    assert compute(bm, a)
    assert not bm.reset_prefix_cache()  # a holds blocks
    bm.free(a)
    assert bm.find_cached_prefix(make_seq(1, [1, 2, 3, 4, 9]))[0]
    assert bm.reset_prefix_cache()
    assert bm.find_cached_prefix(make_seq(2, [1, 2, 3, 4, 9]))[0] == []
    bm.check_invariants([])
