"""Numba kernels of the CPU backend (float32): paged attention and the KV-cache write.

Semantics are those of ``hwlm.attention`` / ``hwlm.kernels.reference``: one attention call serves
prefill, chunked prefill over cached prefix blocks and decode, mixed in one batch.

Attention work is split into items (sequence, up to QUERY_CHUNK of its query tokens, kv head),
sorted heaviest first and dealt out round-robin to one worker per thread. An item keeps the query
rows of all query heads of its kv group in a tile, so that each key/value row is read once per
item, and walks the context KEY_TILE keys at a time with an online softmax (running max and sum
per row), so no score matrix over the whole context is ever built.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload

from hwlm.attention import AttentionMetadata

Array = np.ndarray[Any, Any]  # numba compiles for the arrays' dtypes; annotations are for mypy

KEY_TILE = 32  # keys per online-softmax step, whatever the block size; a multiple of 4
QUERY_CHUNK = 16  # query tokens per work item: splits long prefills across threads
# Calls with less work than these run serially on the calling thread: waking the OpenMP pool
# costs more (decode attention over 64 keys of 12 heads: 10 us serial, 17 us through the pool,
# level at ~300 keys, on the 2-core development machine).
SERIAL_MAX_PRODUCTS = 1 << 17  # query elements x keys
SERIAL_MAX_ELEMENTS = 1 << 16  # key elements written
_NEG = np.float32(-1e30)  # "minus infinity": fastmath assumes there are no infs
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two for an exact range reduction
_LN2_LO = np.float32(-2.12194440e-4)

# numba runs parallel kernels without the GIL: launches from several threads are serialised, as
# they would oversubscribe the cores (and abort the process under numba's workqueue layer).
_launch_lock = threading.Lock()


@intrinsic
def _bits_to_float32(typingctx: Any, bits: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def _as_float32(x: Any) -> Any:
    """A cache element as float32: float32 itself, or the bits of a bfloat16 held in an int16."""
    raise NotImplementedError("compiled only (numba)")


@overload(_as_float32, inline="always")
def _as_float32_impl(x: Any) -> Any:
    # The implementations' signatures must match the stub's, annotations included.
    def as_is(x: Any) -> Any:
        return x

    def widened(x: Any) -> Any:
        return _bits_to_float32(np.int32(x) << np.int32(16))  # type: ignore[call-arg]

    if isinstance(x, types.Float):
        return as_is
    if isinstance(x, types.Integer) and x.bitwidth == 16:  # type: ignore[attr-defined]
        return widened
    return None


@intrinsic
def _prefetch(typingctx: Any, arr: Any, index: Any) -> Any:
    """Hint the cache to fetch arr.flat[index] (arr C-contiguous)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, value=args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
            builder.module, fnty, "llvm.prefetch.p0"
        )
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(arr, index), codegen


@njit(fastmath=True, inline="always", cache=True)
def _exp(x: Any) -> Any:
    """exp(x) for float32 x <= 0 (relative error ~1e-7). Unlike libm's expf LLVM vectorises it."""
    x = max(x, np.float32(-87.0))  # keeps 2**k a normal float; exp(-87) is 0 for our purpose
    k = math.floor(x * _LOG2E + np.float32(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    p = np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    exponent = (np.int32(k) + np.int32(127)) << np.int32(23)
    return p * _bits_to_float32(exponent)  # type: ignore[call-arg]


@njit(fastmath=True, cache=True)
def _plan(
    query: Array,
    kv_cache: Array,
    query_start_loc: Array,
    seq_lens: Array,
    block_tables: Array,
    num_threads: int,
) -> tuple[Array, Array, Array, int, int]:
    """Checks the inputs; returns (order, item_seq, item_start, num_work, num_workers)."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_seqs = seq_lens.shape[0]
    num_blocks = kv_cache.shape[1]
    if query_start_loc[0] < 0 or query_start_loc[num_seqs] > query.shape[0]:
        raise ValueError("query_start_loc does not fit the query")
    for s in range(num_seqs):
        q_len = query_start_loc[s + 1] - query_start_loc[s]
        if q_len < 0 or q_len > seq_lens[s]:
            raise ValueError("each sequence needs 0 <= query_len <= seq_len")
        if (seq_lens[s] + block_size - 1) // block_size > block_tables.shape[1]:
            raise ValueError("block_tables is narrower than a sequence needs")
        for b in range((seq_lens[s] + block_size - 1) // block_size):
            if block_tables[s, b] < 0 or block_tables[s, b] >= num_blocks:
                raise ValueError("block_tables names a block outside the cache")

    # Work items: (sequence, chunk of its query tokens), each for every kv head; heaviest first.
    num_items = 0
    for s in range(num_seqs):
        q_len = query_start_loc[s + 1] - query_start_loc[s]
        num_items += (q_len + QUERY_CHUNK - 1) // QUERY_CHUNK
    item_seq = np.empty(num_items, np.int64)
    item_start = np.empty(num_items, np.int64)
    cost = np.empty(num_items, np.float64)
    i = 0
    for s in range(num_seqs):
        start, end = query_start_loc[s], query_start_loc[s + 1]
        for t0 in range(start, end, QUERY_CHUNK):
            item_seq[i], item_start[i] = s, t0
            cost[i] = -min(QUERY_CHUNK, end - t0) * (seq_lens[s] - end + min(t0 + QUERY_CHUNK, end))
            i += 1
    order = np.argsort(cost)
    num_work = num_items * num_kv_heads  # work w: item order[w // num_kv_heads], kv head w % ...
    # numba's threading layers split a prange into equal contiguous parts, one per thread
    # (workqueue always, whatever the chunk size), so deal the cost-sorted work out round-robin.
    num_workers = max(1, min(num_threads, num_work))

    return order, item_seq, item_start, num_work, num_workers


@njit(fastmath=True, inline="always", cache=True)
def _attend(
    worker: int,
    num_workers: int,
    num_work: int,
    order: Array,
    item_seq: Array,
    item_start: Array,
    query: Array,
    kv_cache: Array,
    query_start_loc: Array,
    seq_lens: Array,
    block_tables: Array,
    scale: float | np.float32,
    out: Array,
) -> None:
    """Worker ``worker``'s share of the planned work: items ``worker``, ``worker + num_workers``..."""
    head_size = query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    scale = np.float32(scale)
    # Scratch for this worker, allocated once per call: none inside the loop.
    max_rows = QUERY_CHUNK * group  # row r = token r // group, query head r % group of the kv group
    qt = np.empty((max_rows, head_size), np.float32)
    ac = np.empty((max_rows, head_size), np.float32)
    mx = np.empty(max_rows, np.float32)
    sm = np.empty(max_rows, np.float32)
    pt = np.empty((max_rows, KEY_TILE), np.float32)
    sl = np.empty(KEY_TILE, np.int64)
    # Cache rows by flat slot: kv_rows[kv, block * block_size + offset, kv_head] is one key/value.
    kv_flat = kv_cache.reshape(kv_cache.size)
    v_off = kv_cache.size // 2
    kv_rows = kv_cache.reshape((2, kv_cache.shape[1] * block_size, num_kv_heads, head_size))
    for w in range(worker, num_work, num_workers):
        item = order[w // num_kv_heads]
        kvh = w % num_kv_heads
        s, t0 = item_seq[item], item_start[item]
        end = query_start_loc[s + 1]
        n_tok = min(QUERY_CHUNK, end - t0)
        pos0 = seq_lens[s] - end + t0  # position of token t0
        for r in range(n_tok * group):
            for d in range(head_size):
                qt[r, d] = query[t0 + r // group, kvh * group + r % group, d] * scale
                ac[r, d] = 0.0
            mx[r] = _NEG
            sm[r] = 0.0
        num_keys = pos0 + n_tok
        for k0 in range(0, num_keys, KEY_TILE):
            nk = min(KEY_TILE, num_keys - k0)
            # Slots of this tile's keys, walking the blocks (one division per tile: integer
            # division per key cost more than the tile's dot products); fetch their rows early.
            block, offset = k0 // block_size, k0 % block_size
            for kk in range(KEY_TILE):
                if k0 + kk < num_keys:
                    sl[kk] = block_tables[s, block] * block_size + offset
                    offset += 1
                    if offset == block_size:
                        block, offset = block + 1, 0
                else:
                    sl[kk] = sl[kk - 1]  # past the end: the last key again (masked below)
                base = (sl[kk] * num_kv_heads + kvh) * head_size
                for d in range(0, head_size, 16):
                    _prefetch(kv_flat, base + d)  # type: ignore[call-arg]
                    _prefetch(kv_flat, v_off + base + d)
            # Scores, four keys at a time: each query row is loaded once per four keys, each
            # key row once for all query rows of the kv group. Past the end of the context the
            # last key is repeated; scores hidden by causality are masked by the softmax below.
            # Key p is seen by the tokens j >= p - pos0, i.e. by rows from (p - pos0) * group.
            for kk in range(0, nk, 4):
                k_0 = kv_rows[0, sl[kk], kvh]
                k_1 = kv_rows[0, sl[kk + 1], kvh]
                k_2 = kv_rows[0, sl[kk + 2], kvh]
                k_3 = kv_rows[0, sl[kk + 3], kvh]
                for r in range(max(0, k0 + kk - pos0) * group, n_tok * group):
                    x0 = x1 = x2 = x3 = np.float32(0.0)
                    for d in range(head_size):
                        qd = qt[r, d]
                        x0 += qd * _as_float32(k_0[d])
                        x1 += qd * _as_float32(k_1[d])
                        x2 += qd * _as_float32(k_2[d])
                        x3 += qd * _as_float32(k_3[d])
                    pt[r, kk], pt[r, kk + 1], pt[r, kk + 2], pt[r, kk + 3] = x0, x1, x2, x3
            # Online softmax: rescale what was accumulated over earlier tiles to the new max.
            for r in range(n_tok * group):
                valid = min(nk, pos0 + r // group - k0 + 1)
                if valid <= 0:
                    continue
                m_new = mx[r]
                for kk in range(valid):
                    m_new = max(m_new, pt[r, kk])
                total = np.float32(0.0)
                for kk in range(valid):
                    e = _exp(pt[r, kk] - m_new)
                    pt[r, kk] = e
                    total += e
                for kk in range(valid, KEY_TILE):
                    pt[r, kk] = 0.0
                corr = _exp(mx[r] - m_new)
                sm[r] = sm[r] * corr + total
                mx[r] = m_new
                if corr != 1.0:
                    for d in range(head_size):
                        ac[r, d] *= corr
            for kk in range(0, nk, 4):
                v_0 = kv_rows[1, sl[kk], kvh]
                v_1 = kv_rows[1, sl[kk + 1], kvh]
                v_2 = kv_rows[1, sl[kk + 2], kvh]
                v_3 = kv_rows[1, sl[kk + 3], kvh]
                for r in range(max(0, k0 + kk - pos0) * group, n_tok * group):
                    e0, e1, e2, e3 = pt[r, kk], pt[r, kk + 1], pt[r, kk + 2], pt[r, kk + 3]
                    for d in range(head_size):
                        ac[r, d] += (
                            e0 * _as_float32(v_0[d])
                            + e1 * _as_float32(v_1[d])
                            + e2 * _as_float32(v_2[d])
                            + e3 * _as_float32(v_3[d])
                        )
        for r in range(n_tok * group):
            inv = np.float32(1.0) / sm[r]
            for d in range(head_size):
                out[t0 + r // group, kvh * group + r % group, d] = ac[r, d] * inv


@njit(parallel=True, fastmath=True, cache=True)
def _attention(
    query: Array,
    kv_cache: Array,
    query_start_loc: Array,
    seq_lens: Array,
    block_tables: Array,
    scale: float | np.float32,
    num_threads: int,
    out: Array,
) -> None:
    order, item_seq, item_start, num_work, num_workers = _plan(
        query, kv_cache, query_start_loc, seq_lens, block_tables, num_threads
    )
    for worker in prange(num_workers):
        _attend(
            worker,
            num_workers,
            num_work,
            order,
            item_seq,
            item_start,
            query,
            kv_cache,
            query_start_loc,
            seq_lens,
            block_tables,
            scale,
            out,
        )


@njit(fastmath=True, cache=True)
def _attention_serial(
    query: Array,
    kv_cache: Array,
    query_start_loc: Array,
    seq_lens: Array,
    block_tables: Array,
    scale: float | np.float32,
    out: Array,
) -> None:
    order, item_seq, item_start, num_work, _ = _plan(
        query, kv_cache, query_start_loc, seq_lens, block_tables, 1
    )
    _attend(
        0,
        1,
        num_work,
        order,
        item_seq,
        item_start,
        query,
        kv_cache,
        query_start_loc,
        seq_lens,
        block_tables,
        scale,
        out,
    )


@njit(inline="always", cache=True)
def _write_kv_row(key: Array, value: Array, kv_rows: Array, slot_mapping: Array, t: int) -> None:
    slot = slot_mapping[t]
    if slot >= 0:  # loops, not row slices: those take seconds to compile for strided rows
        for h in range(key.shape[1]):
            for d in range(key.shape[2]):
                kv_rows[0, slot, h, d] = key[t, h, d]
                kv_rows[1, slot, h, d] = value[t, h, d]


@njit(inline="always", cache=True)
def _check_slots(kv_rows: Array, slot_mapping: Array) -> None:
    for t in range(slot_mapping.shape[0]):
        if slot_mapping[t] >= kv_rows.shape[1]:
            raise ValueError("slot_mapping names a slot outside the cache")


@njit(parallel=True, cache=True)
def _write_kv(key: Array, value: Array, kv_rows: Array, slot_mapping: Array) -> None:
    _check_slots(kv_rows, slot_mapping)
    for t in prange(slot_mapping.shape[0]):
        _write_kv_row(key, value, kv_rows, slot_mapping, t)


@njit(cache=True)
def _write_kv_serial(key: Array, value: Array, kv_rows: Array, slot_mapping: Array) -> None:
    _check_slots(kv_rows, slot_mapping)
    for t in range(slot_mapping.shape[0]):
        _write_kv_row(key, value, kv_rows, slot_mapping, t)


@contextmanager
def _parallel_launch() -> Iterator[int]:
    """Serialise launches; numba's threads follow torch's thread count. Yields that count.

    Starting numba's OpenMP layer (at the first launch) resets the thread count of the OpenMP
    pool it shares with torch (see __init__), so the count torch had is put back afterwards."""
    torch_threads = torch.get_num_threads()
    num_threads = min(torch_threads, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    try:
        with _launch_lock:
            numba.set_num_threads(num_threads)
            yield num_threads
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


CACHE_DTYPES = (torch.float32, torch.bfloat16)


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dtype not in CACHE_DTYPES or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be float32 or bfloat16 [2, num_blocks, block_size, kv_heads, head_size]"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")


def _elements(x: torch.Tensor, cache: torch.Tensor) -> np.ndarray[Any, Any]:
    """``x`` in the cache's element type as numpy: float32, or bfloat16 bits as int16 (numba has
    no bfloat16; the kernels widen them with a shift). Rounds to nearest even, as torch."""
    if cache.dtype == torch.bfloat16:
        return x.detach().to(torch.bfloat16).view(torch.int16).numpy()
    return x.detach().to(torch.float32).numpy()


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store token t's key and value rows ([num_kv_heads, head_size]) at slot slot_mapping[t]
    (block * block_size + offset); slot -1 writes nothing. Key and value may be strided views."""
    _check_cache(kv_cache)
    if key.shape != value.shape or key.shape[1:] != kv_cache.shape[3:]:
        raise ValueError("key and value must be [num_tokens, num_kv_heads, head_size] of the cache")
    if key.shape[0] != slot_mapping.shape[0]:
        raise ValueError("slot_mapping needs one slot per token")
    kv_rows = _elements(kv_cache, kv_cache).reshape(2, -1, *kv_cache.shape[3:])
    # Strided float32 key/value rows are read in place: copying them first measured slower.
    args = (
        _elements(key, kv_cache),
        _elements(value, kv_cache),
        kv_rows,
        slot_mapping.to(torch.int64).contiguous().numpy(),
    )
    if key.numel() < SERIAL_MAX_ELEMENTS:
        _write_kv_serial(*args)
        return
    with _parallel_launch():
        _write_kv(*args)


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal paged attention; returns a new float32 [num_tokens, num_heads, head_size]."""
    _check_cache(kv_cache)
    if query.dtype != torch.float32 or query.dim() != 3 or query.shape[2] != kv_cache.shape[4]:
        raise ValueError("query must be float32 [num_tokens, num_heads, head_size of the cache]")
    if query.shape[1] % kv_cache.shape[3]:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    q = query.detach().contiguous()
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    args = (
        q.numpy(),
        _elements(kv_cache, kv_cache),
        metadata.query_start_loc.to(torch.int32).contiguous().numpy(),
        metadata.seq_lens.to(torch.int32).contiguous().numpy(),
        metadata.block_tables.to(torch.int32).contiguous().numpy(),
        float(scale),
    )
    # An upper bound of the step's query-key products (every token against the longest context).
    if q.numel() * metadata.max_seq_len < SERIAL_MAX_PRODUCTS:
        _attention_serial(*args, out.numpy())
        return out
    with _parallel_launch() as num_threads:
        _attention(*args, num_threads, out.numpy())
    return out
