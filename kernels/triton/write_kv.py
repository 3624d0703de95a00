"""Store this step's keys and values into the paged KV cache.

Launch: one program per token and tile of ``BLOCK_H`` KV heads; a program copies a
``[BLOCK_H, head_size]`` tile of keys and one of values (contiguous along the head dimension, so
the loads and stores vectorise). Slot -1 (padding, or a token whose KV is already cached) makes the
program return before touching memory.

An fp8 (e4m3) cache stores ``clamp(x / scale, -448, 448)`` rounded to nearest even: the division
in float32 and correctly rounded (``div_rn``), and saturating, so that every implementation
(reference, interpreter, GPU) stores the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # the largest finite float8_e4m3fn


@triton.jit  # type: ignore[untyped-decorator]
def _to_cache(x: tl.tensor, scale: tl.tensor, dtype: tl.constexpr, FP8: tl.constexpr) -> tl.tensor:
    """``x`` as stored in a cache of ``dtype``: scaled and saturated for fp8, else only cast."""
    if FP8:
        x = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX, FP8_MAX)
        return x.to(dtype, fp_downcast_rounding="rtne")
    return x.to(dtype)


@triton.jit  # type: ignore[untyped-decorator]
def _write_kv_kernel(
    key_ptr: tl.tensor,
    value_ptr: tl.tensor,
    kv_cache_ptr: tl.tensor,
    slot_ptr: tl.tensor,
    k_scale_ptr: tl.tensor,
    v_scale_ptr: tl.tensor,
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
    FP8: tl.constexpr,
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
    cache_ty: tl.constexpr = kv_cache_ptr.dtype.element_ty
    k_scale = 1.0
    v_scale = 1.0
    if FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(kv_cache_ptr + dst, _to_cache(k, k_scale, cache_ty, FP8), mask=mask)
    v = tl.load(
        value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask
    )
    tl.store(kv_cache_ptr + stride_kv + dst, _to_cache(v, v_scale, cache_ty, FP8), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    *,
    warp_size: int = 32,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_size]`` to their slots.

    ``kv_cache`` is one layer's ``[2, num_blocks, block_size, num_kv_heads, head_size]`` tensor;
    ``slot_mapping`` (int64 ``[num_tokens]``) holds flat slots ``block * block_size + offset``,
    -1 for tokens to skip. Values are cast to the cache dtype; a float8_e4m3fn cache needs
    ``k_scale`` and ``v_scale`` (float32, one element each) and stores ``x / scale``, saturated.
    """
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    assert kv_cache.stride(-1) == 1, "the KV cache must be contiguous along head_size"
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8:
        assert k_scale is not None and v_scale is not None, "an fp8 KV cache needs its scales"
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
        kv_cache if k_scale is None else k_scale,  # unused unless FP8
        kv_cache if v_scale is None else v_scale,
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
        FP8=fp8,
        num_warps=num_warps,
    )
