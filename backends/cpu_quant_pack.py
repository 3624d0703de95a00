"""Weight layouts of ONNX Runtime's quantized CPU kernels, packed and unpacked in numpy.

Two layouts, both from a float ``[N, K]`` weight (N outputs, K inputs, as ``nn.Linear`` stores it):

- ``BlockQuantized``: MatMulNBits (com.microsoft), ``bits`` 4 or 8. Each output row is cut into
  blocks of ``block_size`` inputs (the last one zero-padded); a block is ``block_size`` unsigned
  codes and one float scale, ``w = (code - zero_point) * scale``. 4-bit codes are packed two per
  byte, element ``2i`` in the low nibble. Without explicit zero points the zero point is
  ``2**(bits - 1)`` (8 or 128): the symmetric form, which is also llama.cpp's Q4_0/Q8_0.
- ``ChannelQuantized``: DynamicQuantizeMatMul, int8 codes ``[K, N]`` with one scale per output
  channel, ``w = code * scale`` (zero point 0).

``dequantize_*`` read the packed arrays back without reusing the packing code, so a check of a
kernel against them also checks the packing (nibble order, block order, transposes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class BlockQuantized:
    bits: int  # 4 or 8
    block_size: int  # a power of two >= 16
    n: int
    k: int
    packed: U8  # [N, k_blocks, block_size * bits // 8]
    scales: F32  # [N, k_blocks]
    zero_points: U8 | None  # [N, ceil(k_blocks * bits / 8)] packed as the codes; None: 2**(bits-1)

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)


@dataclass(frozen=True)
class ChannelQuantized:
    codes: npt.NDArray[np.int8]  # [K, N]
    scales: F32  # [N]


def quantize_blocks(weight: F32, bits: int, block_size: int) -> BlockQuantized:
    """Symmetric round-to-nearest per block: the value of largest magnitude maps to the most
    negative code (-8 or -128 around the zero point), as llama.cpp's Q4_0 and Q8_0 do, so every
    code is used."""
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits packing supports 4 or 8 bits, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    n, k = weight.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, k_blocks, block_size)
    half = 1 << (bits - 1)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    scales = (extreme / -half).astype(np.float32)  # [N, k_blocks, 1]
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    codes = np.clip(np.rint(blocks * inverse) + half, 0, 2 * half - 1).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return BlockQuantized(bits, block_size, n, k, codes, scales[..., 0], None)


def dequantize_blocks(q: BlockQuantized) -> F32:
    """The float ``[N, K]`` weights a MatMulNBits node with ``q`` multiplies by."""
    if q.bits == 4:
        low, high = q.packed & 0x0F, q.packed >> 4
        codes = np.stack([low, high], axis=-1).reshape(q.n, q.k_blocks, q.block_size)
    else:
        codes = q.packed
    zero = _unpack_zero_points(q)
    values = (codes.astype(np.float32) - zero[..., None]) * q.scales[..., None]
    return np.ascontiguousarray(values.reshape(q.n, -1)[:, : q.k])


def _unpack_zero_points(q: BlockQuantized) -> F32:
    if q.zero_points is None:
        return np.full((q.n, q.k_blocks), 1 << (q.bits - 1), dtype=np.float32)
    if q.bits == 8:
        return q.zero_points[:, : q.k_blocks].astype(np.float32)
    pairs = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=-1).reshape(q.n, -1)
    return pairs[:, : q.k_blocks].astype(np.float32)


def quantize_channels(weight: F32) -> ChannelQuantized:
    """Symmetric int8 per output channel, codes in [-127, 127]."""
    amax = np.abs(weight).max(axis=1)
    scales = (amax / 127.0).astype(np.float32)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    codes = np.clip(np.rint(weight * inverse[:, None]), -127, 127).astype(np.int8)
    return ChannelQuantized(np.ascontiguousarray(codes.T), scales)


def dequantize_channels(q: ChannelQuantized) -> F32:
    """The float ``[N, K]`` weights a DynamicQuantizeMatMul node with ``q`` multiplies by."""
    return np.ascontiguousarray((q.codes.astype(np.float32) * q.scales[None, :]).T)
