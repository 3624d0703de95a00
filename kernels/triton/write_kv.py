"""Store this step's keys and values into the paged KV cache.

Launch: one program per token and tile of ``BLOCK_H`` KV heads; a program copies a
``[BLOCK_H, head_size]`` tile of keys and one of values (contiguous along the head dimension, so
the loads and stores vectorise). Slot -1 (padding, or a token whose KV is already cached) makes the
program return before touching memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _write_kv_kernel(
    key_ptr: tl.tensor,
    value_ptr: tl.tensor,
    kv_cache_ptr: tl.tensor,
    slot_ptr: tl.tensor,
    stride_kt: tl.tensor,
    stride_kh: tl.tensor,
    stride_vt: tl.tensor,
    stride_vh: tl.tensor,
    stride_kv: tl.tensor,
    stride_cb: tl.tensor,
    stride_cs: tl.tensor,
    stride_ch: tl.tensor,
    block_size: tl.tensor,
    num_kv_heads: tl.tensor,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
) -> None:
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_PAD)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_SIZE)[None, :]
    dst = block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(kv_cache_ptr + dst, k.to(kv_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(
        value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask
    )
    tl.store(kv_cache_ptr + stride_kv + dst, v.to(kv_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    warp_size: int = 32,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_size]`` to their slots.

    ``kv_cache`` is one layer's ``[2, num_blocks, block_size, num_kv_heads, head_size]`` tensor;
    ``slot_mapping`` (int64 ``[num_tokens]``) holds flat slots ``block * block_size + offset``,
    -1 for tokens to skip. Values are cast to the cache dtype.
    """
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    assert kv_cache.stride(-1) == 1, "the KV cache must be contiguous along head_size"
    head_pad = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // head_pad))
    # ~8 elements (16 bytes of bf16) per thread per tensor.
    num_warps = max(1, min(8, block_h * head_pad // (8 * warp_size)))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        kv_cache.shape[2],
        num_kv_heads,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
