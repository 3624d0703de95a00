"""Make Triton's CPU interpreter round like a GPU (only under ``TRITON_INTERPRET=1``).

The interpreter (triton 3.6) differs from compiled kernels in two roundings:

- float32 -> bfloat16 casts truncate (the default ``.to(tl.bfloat16)`` passes no rounding mode,
  and its "round to nearest" mode rounds halves up without carrying into the exponent), where
  GPUs round to nearest even;
- ``tl.fma`` multiplies, rounds, then adds, where the hardware rounds once;
- casts to float8_e4m3 (fp8e4nv; the fp8 KV cache) round without carrying a rounded-up
  mantissa into the exponent (126.4 becomes 64, not 128); casts to and from it are taken by
  torch's float8_e4m3fn instead, which rounds to nearest even like the GPU's ``cvt.rn``.

Both make bfloat16 results drift (a truncated residual stream loses a little every layer) and
float32 results differ in the last place, so the interpreter would test something other than
what runs on a GPU. :func:`install` patches the two conversions; compiled kernels are untouched.
The fused multiply-add is taken in float64 (exact product, one rounding of the sum, one more to
float32), which equals a true single rounding except in rare double-rounding ties.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def bfloat16_bits(data: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(np.ascontiguousarray(data, dtype=np.float32))
    out = np.where(nan, (bits >> 16) | 0x40, rounded)
    return out.astype(np.uint16).reshape(np.shape(data))


def _float32(data: np.ndarray, src: Any) -> np.ndarray:
    """The interpreter's values of Triton type ``src`` (bfloat16 held as uint16) in float32."""
    import triton.language as tl

    if src == tl.bfloat16:
        wide = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16
        return wide.view(np.float32)
    return np.asarray(data, dtype=np.float32)


def fp8_convert(data: np.ndarray, src: Any, dst: Any) -> np.ndarray | None:
    """A float <-> float8_e4m3 cast done by torch (bit patterns as the interpreter holds them),
    or None when neither side is float8_e4m3."""
    import torch
    import triton.language as tl

    floats = (tl.float32, tl.float16, tl.bfloat16)
    if dst == tl.float8e4nv and src in floats:
        values = torch.from_numpy(np.ascontiguousarray(_float32(data, src)))
        return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    if src == tl.float8e4nv and dst in floats:
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
        wide = raw.view(torch.float8_e4m3fn).to(torch.float32).numpy()
        if dst == tl.bfloat16:
            return bfloat16_bits(wide)  # exact: e4m3 values are bfloat16 values
        return wide.astype(np.float16) if dst == tl.float16 else wide
    return None


def install() -> None:
    """Patch the interpreter, once; a no-op when its internals are not the expected ones."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    convert = getattr(interpreter, "_convert_float", None)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if convert is None or builder is None or handle is None or not hasattr(builder, "create_fma"):
        return
    if getattr(convert, "_hwlm_rounding_fix", False):
        return
    rtz = ir.ROUNDING_MODE.RTZ

    def convert_float(data: Any, src: Any, dst: Any, rounding_mode: Any) -> Any:
        if src == tl.float32 and dst == tl.bfloat16 and rounding_mode != rtz:
            return bfloat16_bits(data)
        fp8 = fp8_convert(data, src, dst)
        return convert(data, src, dst, rounding_mode) if fp8 is None else fp8

    fma = builder.create_fma

    def create_fma(self: Any, x: Any, y: Any, z: Any) -> Any:
        kinds = {x.data.dtype, y.data.dtype, z.data.dtype}
        if len(kinds) == 1 and kinds <= {np.dtype(np.float32), np.dtype(np.float16)}:
            with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN, as on a GPU
                wide = x.data.astype(np.float64) * y.data.astype(np.float64) + z.data
                return handle(wide.astype(z.data.dtype), z.dtype.scalar)
        return fma(self, x, y, z)

    convert_float._hwlm_rounding_fix = True  # type: ignore[attr-defined]
    interpreter._convert_float = convert_float
    builder.create_fma = create_fma
