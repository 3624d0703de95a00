"""Quantized dense layers of the cuda backend (and of triton-interpret, which runs the same code on
CPU tensors): fp8 weights with per-token fp8 activations, and weight-only int4/int8 (W4A16).

- ``fp8``: weights float8_e4m3fn with one float32 scale per output channel (amax / 448);
  activations quantized per row at run time by one Triton kernel (``fp8_quant``); the product is
  ``torch._scaled_mm`` with row-wise scales (scale_a [M, 1], scale_b [1, N], float32) and
  bfloat16 output. ``_scaled_mm`` wants K and N multiples of 16: other shapes are padded with
  zero columns/rows at load time.
- ``int4`` / ``int8``: symmetric round-to-nearest codes in groups of 128 inputs with a float16
  scale each (the largest magnitude maps to the most negative code, as llama.cpp's Q4_0 and the
  cpu backend's int4), multiplied by the Triton W4A16 kernels (``w4a16``) with the activations
  as they are (bf16/fp16/fp32) and fp32 sums.

Checkpoint weights that arrive quantized (``hwlm.models.quantized_weight``) use the same kernels:
``GroupQuantizedWeight`` (4 or 8 bits, zero points, a group size that is a multiple of 8 codes or
the whole row) is packed for W4A16 as it is; ``Fp8Weight`` goes to ``_scaled_mm`` as it is.
Nothing here synchronises with the host or depends on tensor values, so CUDA graphs capture it.
"""

from __future__ import annotations

import logging

import torch

from hwlm.backend import DequantizedLinear, QuantizedLinear
from hwlm.kernels.triton.fp8_quant import FP8_MAX, quantize_rows
from hwlm.kernels.triton.w4a16 import (
    DEQUANT_MIN_ROWS,
    PackedWeight,
    dequantize_reference,
    pack_codes,
    w4a16_linear,
)
from hwlm.models.quantized_weight import Fp8Weight, GroupQuantizedWeight, PrequantizedWeight

logger = logging.getLogger(__name__)

METHODS = ("int8", "int4", "fp8")
GROUP_SIZE = 128
BITS = {"int4": 4, "int8": 8}
FP8_ALIGN = 16  # _scaled_mm: K and N multiples of 16
CHUNK_ROWS = 2048  # rows quantized at a time


class W4A16Linear:
    """``x dequant(W)^T + b`` through the W4A16 Triton kernels; any leading shape of ``x``."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None, num_sms: int) -> None:
        self.weight = weight
        self.bias = None if bias is None else bias.to(torch.float32)
        self.num_sms = num_sms
        self.dequant_min_rows = DEQUANT_MIN_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = w4a16_linear(
            x, self.weight, self.bias, self.num_sms, dequant_min_rows=self.dequant_min_rows
        )
        return out

    def dequantized_weight(self) -> torch.Tensor:
        weight: torch.Tensor = dequantize_reference(self.weight)
        return weight


class Fp8Linear:
    """``x W^T + b`` with fp8 weights (per-channel scales) and per-token fp8 activations."""

    def __init__(
        self,
        weight: torch.Tensor,  # float8_e4m3fn [N, K]
        scale: torch.Tensor,  # float32 [N]
        bias: torch.Tensor | None,
    ) -> None:
        n, k = weight.shape
        self.n, self.k = n, k
        n_pad, k_pad = _round_up(n, FP8_ALIGN), _round_up(k, FP8_ALIGN)
        padded = weight.contiguous()
        if (n_pad, k_pad) != (n, k):
            padded = torch.zeros(n_pad, k_pad, dtype=weight.dtype, device=weight.device)
            padded[:n, :k] = weight
        self.weight_t = padded.t()  # [K, N] column-major, as _scaled_mm wants its second operand
        self.scale = torch.ones(1, n_pad, dtype=torch.float32, device=weight.device)
        self.scale[0, :n] = scale.to(torch.float32)
        self.bias = None if bias is None else bias.to(torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.n)
        q, scale_a = quantize_rows(x2, self.weight_t.shape[0])
        y = torch._scaled_mm(
            q, self.weight_t, scale_a=scale_a, scale_b=self.scale, out_dtype=torch.bfloat16
        )
        if y.shape[1] != self.n:
            y = y[:, : self.n]
        if self.bias is not None:  # added here, in float32: not every build's row-wise
            y = y.to(torch.float32) + self.bias  # _scaled_mm takes a bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.n)

    def dequantized_weight(self) -> torch.Tensor:
        weight = self.weight_t.t()[: self.n, : self.k].to(torch.float32)
        return weight * self.scale[0, : self.n, None]


def quantized_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, method: str, num_sms: int
) -> QuantizedLinear:
    """The kernel of a dense layer with float ``weight`` [out, in] quantized by ``method``."""
    if method == "fp8":
        q, scale = quantize_fp8_channels(weight)
        return Fp8Linear(q, scale, bias)
    if method in BITS:
        packed = quantize_groups(weight, BITS[method], GROUP_SIZE)
        return W4A16Linear(packed, bias, num_sms)
    raise ValueError(f"cuda backend: unknown quantization {method!r}; expected one of {METHODS}")


def prequantized_linear(
    weight: PrequantizedWeight, bias: torch.Tensor | None, device: torch.device, num_sms: int
) -> QuantizedLinear:
    """The kernel of a checkpoint's quantized layer, without re-quantizing where a kernel takes
    its layout; otherwise its dequantized weights in a plain layer."""
    bias = None if bias is None else bias.to(device)
    if isinstance(weight, Fp8Weight):
        n = weight.weight.shape[0]
        scale = weight.scale.to(device=device, dtype=torch.float32).reshape(-1).expand(n)
        return Fp8Linear(weight.weight.to(device), scale, bias)
    weight.check()
    per_word = 32 // weight.bits
    if weight.group_size % per_word and weight.group_size != weight.in_features:
        logger.warning(
            "group size %d is not a multiple of %d codes: dequantized to float once",
            weight.group_size,
            per_word,
        )
        return DequantizedLinear(weight.dequantize().to(device), bias)
    return W4A16Linear(pack_group_quantized(weight, device), bias, num_sms)


def pack_group_quantized(weight: GroupQuantizedWeight, device: torch.device) -> PackedWeight:
    """A checkpoint's group-quantized weight in the W4A16 layout (codes packed as they are)."""
    scales = weight.scales.to(device)
    if scales.dtype not in (torch.float16, torch.float32):
        scales = scales.to(torch.float32)
    zeros = None if weight.zeros is None else weight.zeros.to(device=device, dtype=torch.uint8)
    codes = weight.codes.to(device)
    return PackedWeight(
        bits=weight.bits,
        group_size=weight.group_size,
        out_features=weight.out_features,
        in_features=weight.in_features,
        words=torch.cat([pack_codes(c, weight.bits) for c in torch.split(codes, CHUNK_ROWS)]),
        scales=scales.contiguous(),
        zeros=None if zeros is None else zeros.contiguous(),
    )


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int) -> PackedWeight:
    """Symmetric round-to-nearest in groups of ``group_size`` inputs (the last group may be
    shorter): the value of largest magnitude in a group maps to code 0 (``-2**(bits-1)`` around
    the zero point), and the float16 scale is rounded before the codes are computed from it.
    Done in chunks of rows, so the transient float32 and int64 copies stay small."""
    n, k = weight.shape
    parts = [_quantize_rows(chunk, bits, group_size) for chunk in torch.split(weight, CHUNK_ROWS)]
    return PackedWeight(
        bits=bits,
        group_size=group_size,
        out_features=n,
        in_features=k,
        words=torch.cat([words for words, _ in parts]),
        scales=torch.cat([scales for _, scales in parts]),
        zeros=None,
    )


def _quantize_rows(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed words, float16 scales [n, groups]) of some rows, as ``quantize_groups``."""
    n, k = weight.shape
    groups = -(-k // group_size)
    padded = torch.zeros(n, groups * group_size, dtype=torch.float32, device=weight.device)
    padded[:, :k] = weight.to(torch.float32)
    blocks = padded.view(n, groups, group_size)
    half = 1 << (bits - 1)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    scales = (extreme / -half).to(torch.float16)
    s32 = scales.to(torch.float32)
    inverse = torch.where(s32 != 0, 1.0 / s32, torch.zeros_like(s32))
    codes = (torch.round(blocks * inverse) + half).clamp(0, 2 * half - 1).to(torch.uint8)
    return pack_codes(codes.view(n, -1)[:, :k], bits), scales[..., 0].contiguous()


def quantize_fp8_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weights, float32 scale per output channel): ``amax / 448`` per row."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
