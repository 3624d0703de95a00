"""Per-token (per-row) dynamic quantization of activations to float8_e4m3fn, in one kernel.

For row ``m`` of ``x`` [M, K]: ``scale[m] = max(amax_k |x[m, k]|, 1e-12) / 448`` (448 is e4m3fn's
largest finite value) and ``q[m, k] = e4m3(x[m, k] * (1 / scale[m]))``, rounded to nearest even;
columns ``K..K_out`` of ``q`` are written as zeros (padding for ``torch._scaled_mm``, which wants
K a multiple of 16). One program a row: a pass for the maximum, a pass to scale and store (the
row is read twice; the second read comes from cache).

The rounding to e4m3 is done in float32 bit arithmetic before the cast, so that the cast is exact.
That costs a few integer operations per element on a GPU (the kernel is memory-bound) and makes
Triton's CPU interpreter agree with the hardware: the interpreter's own float32 -> fp8 cast
(triton 3.6) drops the carry when rounding up crosses a power of two (124.4 -> 64, not 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
MIN_AMAX = 1e-12  # rows of zeros (CUDA-graph padding rows) get a finite scale
BLOCK = 1024


def quantize_rows(x: torch.Tensor, k_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``q`` float8_e4m3fn [M, k_out], ``scale`` float32 [M, 1]) for ``x`` [M, K] with unit
    stride along K; ``k_out`` >= K (default K) pads ``q`` with zero columns."""
    rows, k = x.shape
    k_out = k if k_out is None else k_out
    if k_out < k:
        raise ValueError(f"quantize_rows: k_out {k_out} is smaller than K {k}")
    q = torch.empty(rows, k_out, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = min(BLOCK, triton.next_power_of_2(k_out))
        _quantize_rows_kernel[(rows,)](
            x, q, scale, k, k_out, x.stride(0), q.stride(0), BLOCK=block, num_warps=4
        )
    return q, scale


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization as a short torch sequence (a reference, and the benchmark's
    alternative to the kernel)."""
    amax = x.abs().amax(-1, keepdim=True).to(torch.float32).clamp(min=MIN_AMAX)
    scale = amax / FP8_MAX
    scaled = (x.to(torch.float32) * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX)
    return scaled.to(torch.float8_e4m3fn), scale


@triton.jit  # type: ignore[untyped-decorator]
def round_to_e4m3(v: tl.tensor) -> tl.tensor:
    """float32 ``v`` in [-448, 448] -> the nearest float8_e4m3fn value (ties to even), as float32."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of float32's 23 mantissa bits; the carry may move to the exponent.
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # ~0xFFFFF
    normal = rounded.to(tl.float32, bitcast=True)
    # Subnormals (below 2**-6): multiples of 2**-9; adding 1.5 * 2**23 rounds to an integer.
    sub = ((v * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit  # type: ignore[untyped-decorator]
def _quantize_rows_kernel(
    x_ptr: tl.tensor,
    q_ptr: tl.tensor,
    s_ptr: tl.tensor,
    K: tl.tensor,
    K_OUT: tl.tensor,
    stride_x: tl.tensor,
    stride_q: tl.tensor,
    BLOCK: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    # IEEE divisions (a plain ``/`` compiles to an approximate one): the same scale, and the same
    # codes, as ``quantize_rows_torch``.
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 448.0)
    tl.store(s_ptr + row, scale)
    inverse = tl.math.div_rn(1.0, scale)
    for k0 in range(0, K_OUT, BLOCK):
        k = k0 + offs
        v = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(v * inverse, -448.0), 448.0)
        q = round_to_e4m3(v)
        tl.store(q_ptr + row * stride_q + k, q.to(q_ptr.dtype.element_ty), mask=k < K_OUT)
