"""Weights that arrive already quantized (AWQ, GPTQ, GGUF checkpoints), in one neutral layout.

A checkpoint reader converts its own packing into ``GroupQuantizedWeight``; a backend turns that
into its kernel's layout (``Backend.prequantized_linear``): the cpu backend packs it for ONNX
Runtime's MatMulNBits, the cuda backend for its W4A16 Triton kernel. The layout is unpacked (one
``uint8`` per code) so that no backend depends on another's nibble order; it lives only while a
layer is being loaded.

Element ``(n, k)`` of the ``[out, in]`` weight is
``(codes[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupQuantizedWeight:
    bits: int  # 4 or 8
    group_size: int  # inputs per scale; a divisor of ``in_features`` or the whole row
    codes: torch.Tensor  # uint8 [out, in], each in [0, 2**bits)
    scales: torch.Tensor  # float [out, in // group_size]
    zeros: torch.Tensor | None  # uint8 [out, in // group_size]; None: 2**(bits-1) (symmetric)

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    def zero_points(self) -> torch.Tensor:
        """The ``uint8 [out, groups]`` zero points, the symmetric default spelled out."""
        if self.zeros is not None:
            return self.zeros
        shape = self.scales.shape
        return torch.full(shape, 1 << (self.bits - 1), dtype=torch.uint8, device=self.codes.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[out, in]`` weights the codes stand for (a reference for kernels, and the
        fallback of a backend without a kernel for this layout)."""
        out = self.out_features
        codes = self.codes.to(torch.float32).reshape(out, -1, self.group_size)
        zeros = self.zero_points().to(torch.float32)[..., None]
        values = (codes - zeros) * self.scales.to(torch.float32)[..., None]
        return values.reshape(out, -1).to(dtype)

    def check(self) -> None:
        """ValueError (one line) when the parts do not describe one weight."""
        out, inp = self.codes.shape
        if self.bits not in (4, 8):
            raise ValueError(f"quantized weight: bits must be 4 or 8, not {self.bits}")
        if self.group_size <= 0 or inp % self.group_size:
            raise ValueError(
                f"quantized weight: group_size {self.group_size} does not divide in_features {inp}"
            )
        groups = inp // self.group_size
        if tuple(self.scales.shape) != (out, groups):
            raise ValueError(
                f"quantized weight: scales have shape {tuple(self.scales.shape)}, "
                f"expected {(out, groups)}"
            )
        if self.zeros is not None and tuple(self.zeros.shape) != (out, groups):
            raise ValueError(
                f"quantized weight: zeros have shape {tuple(self.zeros.shape)}, "
                f"expected {(out, groups)}"
            )


@dataclass(frozen=True)
class Fp8Weight:
    """A weight stored as float8_e4m3fn (HF ``quant_method: fp8``, compressed-tensors float8):
    element ``(n, k)`` is ``weight[n, k] * scale[n]`` (per channel) or ``* scale`` (per tensor,
    a 0-d or one-element ``scale``). Block-scaled checkpoints are converted to this form by their
    reader."""

    weight: torch.Tensor  # float8_e4m3fn [out, in]
    scale: torch.Tensor  # float32 [out] or one element

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.scale.to(torch.float32).reshape(-1)
        scale = scale[:, None] if scale.numel() > 1 else scale.reshape(1, 1)
        return (self.weight.to(torch.float32) * scale).to(dtype)


PrequantizedWeight = GroupQuantizedWeight | Fp8Weight
