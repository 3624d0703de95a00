"""Which pre-quantized format a Hugging Face checkpoint is in (``quantization_config``).

A format names the tensors of one quantized module (``markers``: the ones whose presence says a
module is stored quantized; ``suffixes``: all of its tensors) and converts them into a
``PrequantizedWeight``. Formats hwlm does not read are one clear error naming them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from hwlm.models.quantized_weight import PrequantizedWeight

SUPPORTED = "awq (4-bit, GEMM), gptq (4/8-bit), fp8, compressed-tensors float8, and GGUF files"


class QuantizedFormat(ABC):
    """One checkpoint format's reading rules, built from its ``quantization_config``."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]
    suffixes: ClassVar[tuple[str, ...]]

    @property
    @abstractmethod
    def quantization(self) -> str:
        """The ``quantization=`` setting that names what this checkpoint stores (int4, int8,
        fp8): the only value accepted together with it."""

    @abstractmethod
    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> PrequantizedWeight:
        """The weight of checkpoint module ``module`` from its tensors (keyed by suffix); a
        one-line ValueError when they do not describe one."""


def detect_format(hf_config: dict[str, Any]) -> QuantizedFormat | None:
    """The format of a checkpoint with this config.json, None for float weights; ValueError
    (one line) for a quantized format hwlm does not read."""
    config = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if not config:
        return None
    if not isinstance(config, dict):
        raise ValueError("config.json: quantization_config is not an object")
    method = str(config.get("quant_method", "")).lower()
    if method == "awq":
        from hwlm.models.checkpoints.awq import AwqFormat

        return AwqFormat.from_config(config)
    if method == "gptq":
        from hwlm.models.checkpoints.gptq import GptqFormat

        return GptqFormat.from_config(config)
    if method == "fp8":
        from hwlm.models.checkpoints.fp8 import Fp8Format

        return Fp8Format.from_config(config)
    if method == "compressed-tensors":
        from hwlm.models.checkpoints.fp8 import CompressedFp8Format

        return CompressedFp8Format.from_config(config)
    raise ValueError(
        f"checkpoint quantization {method or 'unnamed'!r} is not supported; hwlm reads {SUPPORTED}"
    )


def unsupported(what: str) -> ValueError:
    """The one-line error for a variant of a known format that hwlm does not read."""
    return ValueError(f"{what} is not supported; hwlm reads {SUPPORTED}")


def check_requested(requested: str | None, stored: str, what: str) -> None:
    """ValueError (one line) when ``quantization=`` asks for something other than what a
    pre-quantized checkpoint stores (``stored``: int4, int8 or fp8; ``what`` names the format)."""
    if requested is not None and requested != stored:
        raise ValueError(
            f"quantization={requested!r} does not match the checkpoint, which stores {what} "
            f"weights ({stored}); leave quantization unset or set it to {stored!r}"
        )
