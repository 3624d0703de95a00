"""Causal paged attention over a mixed batch (prefill, chunked prefill, decode) in Triton.

Semantics are those of ``hwlm.kernels.reference.paged_attention`` (see ``hwlm.attention``).

Design
------
Grid ``(query tiles x splits, num_kv_heads, num_seqs)``. A program owns ``BLOCK_Q`` query tokens
of one sequence and all ``GROUP`` query heads sharing one KV head: its ``BLOCK_M = BLOCK_Q *
GROUP_PAD`` rows are (token, head) pairs, so each K/V tile is loaded once per KV group instead of
once per query head. ``GROUP_PAD`` is the group size rounded up to a power of two (7 -> 8); the
extra rows are masked. ``BLOCK_M >= 16`` because ``tl.dot`` needs at least 16 rows.

The context is walked in tiles of ``BLOCK_N`` keys. Each key's physical block is gathered from the
block table (``block_tables[seq, pos // block_size]``), so a tile may span several pages and the
page size need not equal the tile size. Tiles wholly past the tile's last query position are never
visited (causal skip). Softmax is online, in float32 and base 2 (``scale * log2(e)`` folded into
the scores); ``QK^T`` and ``PV`` are ``tl.dot`` with float32 accumulation; float32 inputs use
``input_precision="ieee"`` (no TF32), so float32 results match a float64 reference to ~1e-5.
Head sizes that are not powers of two (80, 96) are padded to the next power of two with masks.

fp8 (e4m3) caches: K and V tiles are loaded as fp8 (half the bytes of bf16), upcast to the
query's dtype (exact: every e4m3 value is a bf16/fp16 value) and dequantized by their per-tensor
scales. The scales are applied where they cost one multiply, not one per element, and without
rounding a scaled K or V to the query's dtype: ``k_scale`` is folded into the float32 score
scale (``q . (k_scale k) = k_scale (q . k)``) and ``v_scale`` multiplies the float32 output
(``sum p (v_scale v) = v_scale sum p v``). Both are loaded from device tensors, so a captured
CUDA graph sees scales set after capture.

Split-KV (flash-decoding): for decode-only batches with few sequences and long contexts a
program covers only a slice of the context and writes its partial (max, sum, unnormalised acc);
a second kernel merges the slices. ``choose_launch`` decides, from host integers only: nothing
here reads a device tensor on the host, so the call never synchronises.

Launch parameters (``choose_launch``), from a sweep on one H100 (bf16, head size 128, GQA 4)
----------------------------------------------------------------------------------------------
- decode-only batches: ``block_m`` 16 (one token x its group heads, padded to ``tl.dot``'s 16
  rows), ``block_n`` 64, 4 warps, 2 stages: ~2.85 TB/s of KV read (64 sequences x 1k context),
  flat across 2-4 warps, 2-3 stages and 32-128 keys.
- batches with prefill tokens: ``block_m`` 64, ``block_n`` 64, 4 warps, 2 stages: within 3%
  of the best of 16 tried (64/128 rows x 32/64 keys x 4/8 warps x 2/3 stages) for head 64 with
  GQA 1 and head 128 with GQA 4 and 8; ~310 TFLOP/s causal for GQA 4 (4 x 2k tokens), about
  60% of torch's dense flash SDPA, which needs no block-table gather. 128-row tiles were up to
  1.4x slower on mixed batches (one row per token and head: decodes waste a tall tile).
- head size 256: 32 keys per tile, to stay in registers (not timed).
- ``num_warps`` counts 32-thread NVIDIA warps; with ``warp_size=64`` (AMD wavefronts) it is
  halved so that a program keeps the same number of threads.
- split-KV: only when ``max_query_len == 1``, the grid would fill fewer than two programs per
  multiprocessor and the longest context spans at least 8 key tiles; at most 64 splits, and at
  least 4 tiles per split of the longest context (1 x 32k context: ~2.45 TB/s instead of 8
  programs). Each sequence's own context is cut evenly (in whole tiles) among the splits, so the
  launch does not depend on the context lengths: a captured decode graph stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hwlm.attention import AttentionMetadata

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionLaunch:
    """Tile sizes and launch settings of one ``paged_attention`` call."""

    block_m: int  # query rows per program: tokens x padded group heads; a power of two >= 16
    block_n: int  # keys per inner iteration; a power of two >= 16
    num_splits: int = 1  # > 1: split-KV, each program covers 1/num_splits of the context
    num_warps: int = 4
    num_stages: int = 2


def choose_launch(
    *,
    num_seqs: int,
    num_kv_heads: int,
    group: int,
    head_size: int,
    max_query_len: int,
    max_seq_len: int,
    warp_size: int = 32,
    num_sms: int = 132,
) -> AttentionLaunch:
    """Pick tile sizes and launch settings from host-side sizes (see the module docstring)."""
    group_pad = triton.next_power_of_2(group)
    head_pad = triton.next_power_of_2(head_size)
    if max_query_len == 1:  # decode: a tile is one token's group heads
        block_m, block_n = 16, 64
    else:
        block_m, block_n = 64, 64
    if head_pad > 128:  # keep q, acc and the K/V tiles in registers
        block_n = 32
    # No taller than the longest query needs; never below tl.dot's 16 rows or one token's group.
    block_m = max(16, group_pad, min(block_m, triton.next_power_of_2(max_query_len * group_pad)))
    num_warps = 8 if block_m >= 128 else 4
    num_warps = max(1, num_warps * 32 // warp_size)
    num_splits = 1
    if max_query_len == 1:
        programs = num_seqs * num_kv_heads
        min_split = 4 * block_n
        if programs < 2 * num_sms and max_seq_len >= 2 * min_split:
            num_splits = min(triton.cdiv(2 * num_sms, programs), max_seq_len // min_split, 64)
    return AttentionLaunch(block_m, block_n, max(1, num_splits), num_warps, 2)


@triton.jit  # type: ignore[untyped-decorator]
def _dot(a: tl.tensor, b: tl.tensor, acc: tl.tensor, UPCAST: tl.constexpr) -> tl.tensor:
    """``a @ b + acc`` in float32 (no TF32); UPCAST multiplies in float32 (interpreter only)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit  # type: ignore[untyped-decorator]
def _load_tile(
    ptrs: tl.tensor,
    key_mask: tl.tensor,
    dim_mask: tl.tensor,
    MASK_KEYS: tl.constexpr,
    MASK_DIMS: tl.constexpr,
) -> tl.tensor:
    """Masks only where needed: unmasked loads of full tiles vectorise and pipeline best."""
    if MASK_KEYS:
        x = tl.load(ptrs, mask=key_mask & dim_mask, other=0.0)
    elif MASK_DIMS:
        x = tl.load(ptrs, mask=dim_mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit  # type: ignore[untyped-decorator]
def _attend_tile(
    q: tl.tensor,
    q_pos: tl.tensor,
    m_i: tl.tensor,
    l_i: tl.tensor,
    acc: tl.tensor,
    start: tl.tensor,
    hi: tl.tensor,
    table: tl.tensor,
    k_head_ptr: tl.tensor,
    v_head_ptr: tl.tensor,
    stride_cb: tl.tensor,
    stride_cs: tl.tensor,
    scale_log2: tl.tensor,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    FP8: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """One online-softmax step over keys ``start .. start + BLOCK_N``.

    CAUSAL=False is for tiles that every query row sees in full (keys below the tile's first
    query position and below ``hi``): no key masks at all.
    """
    keys = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_PAD)
    key_ok = keys < hi
    if CAUSAL:
        block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0)
    else:
        block = tl.load(table + keys // BLOCK_SIZE)
    slot = block.to(tl.int64) * stride_cb + (keys % BLOCK_SIZE) * stride_cs
    dim_ok = dims < HEAD_SIZE
    MASK_DIMS: tl.constexpr = HEAD_PAD != HEAD_SIZE
    k = _load_tile(
        k_head_ptr + slot[None, :] + dims[:, None],
        key_ok[None, :],
        dim_ok[:, None],
        CAUSAL,
        MASK_DIMS,
    )
    if FP8:  # the scale is in scale_log2
        k = k.to(q.dtype)
    s = _dot(q, k, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST_DOT) * scale_log2
    if CAUSAL:
        s = tl.where(key_ok[None, :] & (keys[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(
        v_head_ptr + slot[:, None] + dims[None, :],
        key_ok[:, None],
        dim_ok[None, :],
        CAUSAL,
        MASK_DIMS,
    )
    if FP8:  # the scale multiplies the output
        v = v.to(q.dtype)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT)
    return m_new, l_i, acc


# The block table's width changes from step to step; specialising on it (== 1, divisible by 16)
# would compile new variants mid-run.
@triton.jit(do_not_specialize=["stride_bt"])  # type: ignore[untyped-decorator]
def _attention_kernel(
    out_ptr: tl.tensor,
    part_acc_ptr: tl.tensor,
    part_max_ptr: tl.tensor,
    part_sum_ptr: tl.tensor,
    q_ptr: tl.tensor,
    kv_cache_ptr: tl.tensor,
    query_start_ptr: tl.tensor,
    seq_lens_ptr: tl.tensor,
    block_tables_ptr: tl.tensor,
    k_scale_ptr: tl.tensor,
    v_scale_ptr: tl.tensor,
    scale_log2: tl.tensor,
    stride_qt: tl.tensor,
    stride_qh: tl.tensor,
    stride_ot: tl.tensor,
    stride_oh: tl.tensor,
    stride_cb: tl.tensor,
    stride_cs: tl.tensor,
    stride_ch: tl.tensor,
    stride_bt: tl.tensor,
    stride_kv: tl.tensor,
    num_heads: tl.tensor,
    num_splits: tl.tensor,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    FP8: tl.constexpr,
) -> None:
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    q_tile = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP_PAD  # query token within the sequence
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = first_pos + q_idx
    token = (q_start + q_idx).to(tl.int64)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_SIZE
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)

    # Keys [lo, hi): causal end of this tile's last query, clipped to this program's split.
    last_q = tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    hi = first_pos + last_q + 1
    lo = 0
    if SPLIT:  # each sequence's own context is cut into num_splits whole-tile pieces
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        lo = split * split_len
        hi = tl.minimum(hi, lo + split_len)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = kv_cache_ptr + kv_head * stride_ch
    v_head_ptr = kv_cache_ptr + stride_kv + kv_head * stride_ch
    # Whole tiles up to the tile's first query position need no mask; only the rest (the
    # diagonal band, at most BLOCK_Q keys plus alignment) is masked. `mid` stays aligned.
    visible_to_all = first_pos + q_tile * BLOCK_Q + 1 - lo
    mid = tl.minimum(lo + tl.maximum(visible_to_all, 0) // BLOCK_N * BLOCK_N, hi)
    for start in range(lo, mid, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, q_pos, m_i, l_i, acc, start, hi, table, k_head_ptr, v_head_ptr,
            stride_cb, stride_cs, scale_log2,
            BLOCK_SIZE, HEAD_SIZE, HEAD_PAD, BLOCK_N, False, UPCAST_DOT, FP8,
        )  # fmt: skip
    for start in range(mid, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, q_pos, m_i, l_i, acc, start, hi, table, k_head_ptr, v_head_ptr,
            stride_cb, stride_cs, scale_log2,
            BLOCK_SIZE, HEAD_SIZE, HEAD_PAD, BLOCK_N, True, UPCAST_DOT, FP8,
        )  # fmt: skip
    if FP8:
        acc = acc * tl.load(v_scale_ptr)

    if SPLIT:
        part = (token * num_heads + head) * num_splits + split
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_PAD + dims[None, :], acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )


@triton.jit  # type: ignore[untyped-decorator]
def _merge_splits_kernel(
    out_ptr: tl.tensor,
    part_acc_ptr: tl.tensor,
    part_max_ptr: tl.tensor,
    part_sum_ptr: tl.tensor,
    stride_ot: tl.tensor,
    stride_oh: tl.tensor,
    num_heads: tl.tensor,
    num_splits: tl.tensor,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
) -> None:
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    part = (token * num_heads + head) * num_splits + splits
    m = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    s = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_all)  # empty splits (m = -inf) weigh 0
    total = tl.sum(w * s, 0)
    dims = tl.arange(0, HEAD_PAD)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_PAD + dims[None, :], mask=split_ok[:, None], other=0.0
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_SIZE,
    )


# The Triton interpreter (3.6) holds bfloat16 as uint16 and tl.dot multiplies those integers;
# interpreted bfloat16 dots therefore run in float32 (after the same rounding to bfloat16).
_INTERPRETED = not isinstance(_attention_kernel, triton.runtime.JITFunction)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    *,
    launch: AttentionLaunch | None = None,
    warp_size: int = 32,
    num_sms: int = 132,
) -> torch.Tensor:
    """Causal paged attention; returns ``[num_tokens, num_heads, head_size]`` in query's dtype.

    ``query`` is ``[num_tokens, num_heads, head_size]``; ``kv_cache`` one layer's
    ``[2, num_blocks, block_size, num_kv_heads, head_size]`` cache already holding this step's
    keys and values; ``num_heads`` must be a multiple of ``num_kv_heads``. A float8_e4m3fn cache
    needs ``k_scale`` and ``v_scale`` (float32, one element each): it holds ``k / k_scale`` and
    ``v / v_scale`` (``hwlm.kernels.triton.write_kv``). ``launch`` overrides
    ``choose_launch`` (tests, tuning); ``warp_size`` and ``num_sms`` feed its heuristics.
    """
    num_tokens, num_heads, head_size = query.shape
    _, _, block_size, num_kv_heads, cache_head_size = kv_cache.shape
    assert cache_head_size == head_size and num_heads % num_kv_heads == 0
    assert kv_cache.stride(-1) == 1, "the KV cache must be contiguous along head_size"
    group = num_heads // num_kv_heads
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8:
        assert k_scale is not None and v_scale is not None, "an fp8 KV cache needs its scales"
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_seqs = metadata.num_seqs
    if num_tokens == 0 or num_seqs == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    if launch is None:
        launch = choose_launch(
            num_seqs=num_seqs,
            num_kv_heads=num_kv_heads,
            group=group,
            head_size=head_size,
            max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len,
            warp_size=warp_size,
            num_sms=num_sms,
        )
    group_pad = triton.next_power_of_2(group)
    head_pad = triton.next_power_of_2(head_size)
    assert launch.block_m >= max(16, group_pad), "block_m must hold one token's group heads"
    block_q = launch.block_m // group_pad
    num_splits = launch.num_splits
    split = num_splits > 1
    if split:
        parts = (num_tokens, num_heads, num_splits)
        part_acc = torch.empty((*parts, head_pad), dtype=torch.float32, device=query.device)
        part_max = torch.empty(parts, dtype=torch.float32, device=query.device)
        part_sum = torch.empty(parts, dtype=torch.float32, device=query.device)
    else:
        part_acc = part_max = part_sum = out  # unused
    block_tables = metadata.block_tables
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    grid = (triton.cdiv(metadata.max_query_len, block_q) * num_splits, num_kv_heads, num_seqs)
    _attention_kernel[grid](
        out,
        part_acc,
        part_max,
        part_sum,
        query,
        kv_cache,
        metadata.query_start_loc,
        metadata.seq_lens,
        block_tables,
        kv_cache if k_scale is None else k_scale,  # unused unless FP8
        kv_cache if v_scale is None else v_scale,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        kv_cache.stride(0),
        num_heads,
        num_splits,
        BLOCK_SIZE=block_size,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_N=launch.block_n,
        SPLIT=split,
        UPCAST_DOT=_INTERPRETED and query.dtype == torch.bfloat16,
        FP8=fp8,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out,
            part_acc,
            part_max,
            part_sum,
            out.stride(0),
            out.stride(1),
            num_heads,
            num_splits,
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=max(1, 4 * 32 // warp_size),
        )
    return out
