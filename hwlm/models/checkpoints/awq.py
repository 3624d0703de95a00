"""AWQ checkpoints (AutoAWQ's GEMM version, ``quant_method: awq``).

Per quantized linear: ``qweight`` int32 [in, out / 8], eight 4-bit codes a word along the output
dimension in AWQ's interleaved order (the word's nibble ``i`` holds column ``AWQ_ORDER[i]`` of its
eight); ``qzeros`` int32 [in / group, out / 8], packed the same way; ``scales`` float16
[in / group, out]. Element ``(k, n)`` is ``(code - zero) * scale`` of its group: exactly a
``GroupQuantizedWeight`` once transposed to [out, in].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hwlm.models.checkpoints.formats import QuantizedFormat, unsupported
from hwlm.models.checkpoints.int_packing import unpack_last
from hwlm.models.quantized_weight import GroupQuantizedWeight, PrequantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column c of a word is its nibble _UNDO_ORDER[c].
_UNDO_ORDER = tuple(AWQ_ORDER.index(c) for c in range(8))


@dataclass(frozen=True)
class AwqFormat(QuantizedFormat):
    group_size: int

    name: ClassVar[str] = "awq"
    markers: ClassVar[tuple[str, ...]] = ("qweight",)
    suffixes: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AwqFormat:
        bits = int(config.get("bits", config.get("w_bit", 4)))
        version = str(config.get("version", "gemm")).lower()
        if bits != 4:
            raise unsupported(f"awq with {bits}-bit weights")
        if version != "gemm":
            raise unsupported(f"awq version {version!r}")
        if not config.get("zero_point", True):
            raise unsupported("awq without zero points (zero_point: false)")
        return cls(int(config.get("group_size", config.get("q_group_size", 128))))

    @property
    def quantization(self) -> str:
        return "int4"

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> PrequantizedWeight:
        missing = [s for s in self.suffixes if s not in tensors]
        if missing:
            raise ValueError(f"awq checkpoint: {module} lacks {', '.join(missing)}")
        codes = unpack_awq(tensors["qweight"]).T.contiguous()
        zeros = unpack_awq(tensors["qzeros"]).T.contiguous()
        scales = tensors["scales"].T.contiguous()
        groups = scales.shape[1]
        if groups == 0 or codes.shape[1] % groups:
            raise ValueError(
                f"awq checkpoint: {module} has {groups} scale groups for {codes.shape[1]} inputs"
            )
        weight = GroupQuantizedWeight(4, codes.shape[1] // groups, codes, scales, zeros)
        _checked(weight, module)
        return weight


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """uint8 codes [r, c * 8] of AWQ's int32 words [r, c], columns in their natural order."""
    nibbles = unpack_last(words, 4).reshape(words.shape[0], -1, 8)
    return nibbles[..., list(_UNDO_ORDER)].reshape(words.shape[0], -1)


def _checked(weight: GroupQuantizedWeight, module: str) -> None:
    try:
        weight.check()
    except ValueError as err:
        raise ValueError(f"{module}: {err}") from None
