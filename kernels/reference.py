"""Pure-torch paged attention: the readable definition every backend is checked against.

Slow (a Python loop over sequences) and exact: pass ``compute_dtype=torch.float64`` to get the
reference the conformance suite compares with.
"""

from __future__ import annotations

import torch

from hwlm.attention import AttentionMetadata


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[0, blocks, offsets] = key[keep].to(kv_cache.dtype)
    kv_cache[1, blocks, offsets] = value[keep].to(kv_cache.dtype)


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
) -> torch.Tensor:
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
        k = k.to(dtype).repeat_interleave(group, dim=1)  # [seq_len, heads, d]
        v = v.to(dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
    return out


def copy_blocks(kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
    for cache in kv_caches:
        for src, dst in pairs:
            cache[:, dst] = cache[:, src]
