"""GPTQ checkpoints (AutoGPTQ / GPTQModel, ``quant_method: gptq``), 4 or 8 bits.

Per quantized linear: ``qweight`` int32 [in * bits / 32, out], codes packed along the input
dimension in order (the first in the lowest bits); ``qzeros`` int32 [groups, out * bits / 32],
packed along the output dimension the same way; ``scales`` float16 [groups, out]; ``g_idx`` int32
[in], the group of each input. Element ``(k, n)`` is ``(code - zero) * scale`` of group
``g_idx[k]``.

The original format (``checkpoint_format: gptq``, and checkpoints that do not say) stores each
zero point minus one; ``gptq_v2`` stores it as it is. Act-order checkpoints (``desc_act``), whose
``g_idx`` is not ``k // group_size``, would need the inputs permuted; they are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hwlm.models.checkpoints.formats import QuantizedFormat, unsupported
from hwlm.models.checkpoints.int_packing import unpack_first, unpack_last
from hwlm.models.quantized_weight import GroupQuantizedWeight, PrequantizedWeight

_FORMATS = {"gptq": True, "gptq_v2": False}  # checkpoint_format -> zero points stored minus one


@dataclass(frozen=True)
class GptqFormat(QuantizedFormat):
    bits: int
    zeros_minus_one: bool

    name: ClassVar[str] = "gptq"
    markers: ClassVar[tuple[str, ...]] = ("qweight",)
    suffixes: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales", "g_idx")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GptqFormat:
        bits = int(config.get("bits", 4))
        fmt = str(config.get("checkpoint_format") or "gptq").lower()
        if config.get("is_marlin_format"):
            fmt = "marlin"
        if bits not in (4, 8):
            raise unsupported(f"gptq with {bits}-bit weights")
        if fmt not in _FORMATS:
            raise unsupported(f"gptq checkpoint_format {fmt!r}")
        return cls(bits, _FORMATS[fmt])

    @property
    def quantization(self) -> str:
        return f"int{self.bits}"

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> PrequantizedWeight:
        missing = [s for s in ("qweight", "qzeros", "scales") if s not in tensors]
        if missing:
            raise ValueError(f"gptq checkpoint: {module} lacks {', '.join(missing)}")
        codes = unpack_first(tensors["qweight"], self.bits).T.contiguous()
        scales = tensors["scales"].T.contiguous()
        out, inputs = codes.shape
        groups = scales.shape[1]
        if groups == 0 or inputs % groups:
            raise ValueError(f"gptq checkpoint: {module} has {groups} groups for {inputs} inputs")
        group_size = inputs // groups
        _check_group_order(tensors.get("g_idx"), group_size, inputs, module)
        zeros = self._zeros(tensors["qzeros"], out, module)
        weight = GroupQuantizedWeight(self.bits, group_size, codes, scales, zeros)
        try:
            weight.check()
        except ValueError as err:
            raise ValueError(f"{module}: {err}") from None
        return weight

    def _zeros(self, qzeros: torch.Tensor, out: int, module: str) -> torch.Tensor:
        zeros = unpack_last(qzeros, self.bits)[:, :out].to(torch.int32)
        if self.zeros_minus_one:
            zeros = zeros + 1
        if int(zeros.max()) >= 1 << self.bits:
            raise ValueError(
                f"gptq checkpoint: {module} has a zero point of {1 << self.bits}, which the "
                f"original gptq format cannot express in {self.bits} bits (re-save as gptq_v2)"
            )
        return zeros.T.contiguous().to(torch.uint8)


def _check_group_order(
    g_idx: torch.Tensor | None, group_size: int, inputs: int, module: str
) -> None:
    if g_idx is None:
        return
    expected = torch.arange(inputs, device=g_idx.device) // group_size
    if g_idx.shape != expected.shape or not torch.equal(g_idx.to(expected.dtype), expected):
        raise ValueError(
            f"gptq checkpoint: {module} uses act-order (desc_act: a g_idx that is not "
            "k // group_size), which is not supported; use a checkpoint quantized without desc_act"
        )
