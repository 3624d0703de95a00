"""Pure-torch paged attention: the readable definition every backend is checked against.

Slow (a Python loop over sequences) and exact: pass ``compute_dtype=torch.float64`` to get the
reference the conformance suite compares with.

An fp8 cache (``torch.float8_e4m3fn``, ``kv_cache_dtype="fp8"``) holds ``k / k_scale`` and
``v / v_scale`` with per-tensor scales (float32 tensors of one element), saturated to e4m3's
range and rounded to nearest even; attention reads ``fp8 * scale``.
"""

from __future__ import annotations

import torch

from hwlm.attention import AttentionMetadata

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` (in float32) saturated to +-448 and rounded to the nearest e4m3 value."""
    scaled = x.to(torch.float32) / scale.to(device=x.device, dtype=torch.float32)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _to_cache(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    if dtype == FP8_DTYPE:
        assert scale is not None, "an fp8 KV cache needs its scales"
        return to_fp8(x, scale)
    return x.to(dtype)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[0, blocks, offsets] = _to_cache(key[keep], kv_cache.dtype, k_scale)
    kv_cache[1, blocks, offsets] = _to_cache(value[keep], kv_cache.dtype, v_scale)


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, num_kv_heads, head_size] of one sequence, read via its blocks."""
    block_size = kv_cache.shape[2]
    positions = torch.arange(seq_len, device=kv_cache.device)
    blocks = block_table.long()[positions // block_size]
    offsets = positions % block_size
    return kv_cache[0, blocks, offsets], kv_cache[1, blocks, offsets]


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    compute_dtype: torch.dtype | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` over the paged cache, in ``compute_dtype`` (default: the
    query's). With ``k_scale``/``v_scale`` the cached keys/values are multiplied by them after
    the cast (an fp8 cache's dequantization); the output has ``compute_dtype``."""
    dtype = compute_dtype or query.dtype
    num_heads = query.shape[1]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty(query.shape, dtype=dtype, device=query.device)
    starts = metadata.query_start_loc.tolist()
    for i, seq_len in enumerate(metadata.seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        q = query[start:end].to(dtype)  # [q_len, heads, d]
        k, v = gather_context(kv_cache, metadata.block_tables[i], seq_len)
        k = _dequantized(k, dtype, k_scale).repeat_interleave(group, dim=1)  # [seq_len, heads, d]
        v = _dequantized(v, dtype, v_scale).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
    return out


def _dequantized(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    x = x.to(dtype)
    return x if scale is None else x * scale.to(device=x.device, dtype=dtype)


def copy_blocks(kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
    for cache in kv_caches:
        for src, dst in pairs:
            cache[:, dst] = cache[:, src]
