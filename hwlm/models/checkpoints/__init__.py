"""Checkpoints that store their dense layers already quantized.

- ``quantization_config`` in config.json: AWQ (``awq``), GPTQ (``gptq``), fp8 (``fp8``) and
  compressed-tensors float8 (``formats.detect_format``); their tensors are converted into the
  neutral layouts of ``hwlm.models.quantized_weight`` and handed to the backend's
  ``prequantized_linear`` (``assemble.load_prequantized``).
- GGUF files (llama.cpp's format; ``gguf_model``), whose config and tokenizer also come from the
  file.

docs/quantization.md ("Checkpoints") lists which types map exactly and which are dequantized once
at load.
"""

from __future__ import annotations

from hwlm.models.checkpoints.formats import QuantizedFormat, detect_format

__all__ = ["QuantizedFormat", "detect_format"]
