"""fp8 checkpoints: HF ``quant_method: fp8`` and compressed-tensors float8.

Per quantized linear, ``weight`` is float8_e4m3fn [out, in] with, by format:
- HF fp8 with ``weight_block_size`` (DeepSeek-V3, Qwen3-FP8): ``weight_scale_inv`` float32
  [ceil(out / bo), ceil(in / bi)], one multiplier per block;
- HF fp8 without it, and compressed-tensors: ``weight_scale`` with one element (per tensor) or
  ``[out]`` / ``[out, 1]`` elements (per channel); compressed-tensors' block strategy stores
  block multipliers in ``weight_scale`` as HF fp8 does in ``weight_scale_inv``.

``Fp8Weight`` holds one scale per output channel (or one per tensor), so block-scaled weights are
dequantized to float32 and quantized again per channel at load (one more rounding of each
weight, to e4m3 with the row's own scale). A static ``input_scale`` is not used: activations are
quantized per token at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hwlm.models.checkpoints.formats import QuantizedFormat, unsupported
from hwlm.models.quantized_weight import Fp8Weight, PrequantizedWeight

E4M3_MAX = 448.0


@dataclass(frozen=True)
class Fp8Format(QuantizedFormat):
    block: tuple[int, int] | None  # (out, in) block of one scale; None: per tensor or channel

    name: ClassVar[str] = "fp8"
    markers: ClassVar[tuple[str, ...]] = ("weight_scale_inv", "weight_scale")
    suffixes: ClassVar[tuple[str, ...]] = (
        "weight",
        "weight_scale_inv",
        "weight_scale",
        "input_scale",
    )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Format:
        fmt = str(config.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise unsupported(f"fp8 checkpoint with fmt {fmt!r}")
        block = config.get("weight_block_size")
        return cls(None if block is None else (int(block[0]), int(block[1])))

    @property
    def quantization(self) -> str:
        return "fp8"

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> PrequantizedWeight:
        weight = _fp8_weight(tensors, module)
        if "weight_scale_inv" in tensors:
            return from_blocks(weight, tensors["weight_scale_inv"], self.block, module)
        return from_scale(weight, tensors.get("weight_scale"), module)


@dataclass(frozen=True)
class CompressedFp8Format(QuantizedFormat):
    block: tuple[int, int] | None

    name: ClassVar[str] = "compressed-tensors"
    markers: ClassVar[tuple[str, ...]] = ("weight_scale",)
    suffixes: ClassVar[tuple[str, ...]] = ("weight", "weight_scale", "input_scale")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedFp8Format:
        fmt = str(config.get("format", "")).lower()
        groups = config.get("config_groups") or {}
        schemes = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
        if fmt not in ("float-quantized", "naive-quantized") or not schemes:
            raise unsupported(f"compressed-tensors format {fmt or 'unnamed'!r}")
        blocks = set()
        for scheme in schemes:
            kind, bits = str(scheme.get("type", "")), int(scheme.get("num_bits", 0))
            strategy = str(scheme.get("strategy", "tensor"))
            if kind != "float" or bits != 8 or strategy not in ("tensor", "channel", "block"):
                raise unsupported(
                    f"compressed-tensors {kind or 'untyped'} {bits}-bit weights ({strategy})"
                )
            shape = scheme.get("block_structure")
            blocks.add(None if strategy != "block" or not shape else (int(shape[0]), int(shape[1])))
        if len(blocks) > 1:
            raise unsupported("compressed-tensors with several weight block shapes")
        return cls(blocks.pop())

    @property
    def quantization(self) -> str:
        return "fp8"

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> PrequantizedWeight:
        weight = _fp8_weight(tensors, module)
        scale = tensors.get("weight_scale")
        if self.block is not None and scale is not None and scale.dim() == 2 and scale.shape[1] > 1:
            return from_blocks(weight, scale, self.block, module)
        return from_scale(weight, scale, module)


def _fp8_weight(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    weight = tensors.get("weight")
    if weight is None:
        raise ValueError(f"fp8 checkpoint: {module} has scales but no weight")
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8 checkpoint: {module}.weight is {weight.dtype}, not float8_e4m3fn")
    return weight


def from_scale(weight: torch.Tensor, scale: torch.Tensor | None, module: str) -> Fp8Weight:
    """A weight with one scale per tensor or per output channel."""
    if scale is None:
        raise ValueError(f"fp8 checkpoint: {module} lacks weight_scale")
    flat = scale.to(torch.float32).reshape(-1)
    if flat.numel() not in (1, weight.shape[0]):
        raise ValueError(
            f"fp8 checkpoint: {module}.weight_scale has {flat.numel()} elements for "
            f"{weight.shape[0]} outputs"
        )
    return Fp8Weight(weight, flat if flat.numel() > 1 else flat.reshape(()))


def from_blocks(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, module: str
) -> Fp8Weight:
    """A block-scaled weight, dequantized and quantized again with one scale per channel."""
    out, inputs = weight.shape
    bo, bi = block or (-(-out // scale.shape[0]), -(-inputs // scale.shape[1]))
    if tuple(scale.shape) != (-(-out // bo), -(-inputs // bi)):
        raise ValueError(
            f"fp8 checkpoint: {module} has block scales of shape {tuple(scale.shape)} for a "
            f"{out}x{inputs} weight in {bo}x{bi} blocks"
        )
    full = scale.to(torch.float32).repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)
    values = weight.to(torch.float32) * full[:, :inputs]
    return quantize_rows(values)


def quantize_rows(values: torch.Tensor) -> Fp8Weight:
    """float [out, in] -> e4m3 with one scale per row (its largest magnitude maps to 448)."""
    amax = values.abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / E4M3_MAX
    codes = (values / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(codes, scale)
