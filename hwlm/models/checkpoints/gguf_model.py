"""Serving a GGUF file (``hwlm serve model.gguf``, ``LLM(model="model.gguf")``).

The file is the whole model: config (``gguf_config``), tokenizer (transformers builds one from
the file's vocabulary; ``hwlm.text.tokenizer``) and weights. Q8_0 and Q4_0 dense layers go to the
backend's ``prequantized_linear`` as they are; every other tensor is dequantized once into the
model's float parameters (``gguf_tensors``). Embeddings, norms and, in K-quant files, most
layers are float after loading; a float file (F32/F16/BF16) may still be quantized at load with
``quantization=``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hwlm.backend import Backend
from hwlm.config import ModelConfig
from hwlm.models import CausalLM, build_model
from hwlm.models.checkpoints.assemble import QuantizedModule, attach_prequantized, fused_target
from hwlm.models.checkpoints.formats import check_requested
from hwlm.models.checkpoints.gguf_config import hf_config
from hwlm.models.checkpoints.gguf_tensors import (
    dequantized,
    group_quantized,
    hf_name,
    unpermute_group_quantized,
    unpermute_rows,
)
from hwlm.models.layers import Linear
from hwlm.models.quantization import check_quantization, quantize_model

if TYPE_CHECKING:
    from hwlm.models.loader import ResolvedModel

logger = logging.getLogger(__name__)

# Checkpoint projections a backend may run as stored (embeddings must be float: a lookup).
_DENSE = ("_proj.weight", "lm_head.weight")


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path``; ValueError (one line) without the package or file."""
    try:
        import gguf
    except ImportError:
        raise ValueError(
            "reading GGUF files needs the gguf package: pip install 'hwlm[gguf]'"
        ) from None
    if not Path(path).is_file():
        raise ValueError(f"GGUF file '{path}' does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ValueError(f"cannot read GGUF file '{path}': {exc}") from exc


def resolve_gguf(path: str | Path, name: str) -> ResolvedModel:
    """Config, weights and tokenizer of a GGUF file: all the file itself."""
    from hwlm.models.loader import ResolvedModel

    reader = open_gguf(path)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return ResolvedModel(hf_config(reader, has_output, str(path)), str(path), str(path), name)


def load_gguf_model(
    resolved: ResolvedModel,
    model_config: ModelConfig,
    backend: Backend,
    dtype: torch.dtype,
    quantization: str | None,
) -> CausalLM:
    """The model of a GGUF file, its Q8_0/Q4_0 layers pre-quantized, the rest float; with
    ``quantization`` (allowed only where it names what the file stores, or for a float file)
    the float dense layers are quantized at load."""
    assert resolved.weights_path is not None
    start = time.perf_counter()
    reader = open_gguf(resolved.weights_path)
    stored = _stored_quantization(reader)
    if stored is not None:
        check_requested(quantization, stored, "GGUF")
        quantization = None
    check_quantization(quantization, backend)
    model = build_model(model_config, backend, dtype)
    heads = (model_config.num_heads, model_config.num_kv_heads)
    unpermute = str(model_config.hf.get("model_type")) == "llama"
    with torch.no_grad():
        plan = _Plan(reader, heads if unpermute else None, model)
        attach_prequantized(model, backend, plan.quantized(), "gguf")
        model.load_weights(plan.floats())
        if quantization is not None:
            quantize_model(model, backend, quantization)
    logger.info("loaded GGUF file %s in %.1f s", resolved.weights_path, time.perf_counter() - start)
    return model.eval()


class _Plan:
    """The file's tensors by Hugging Face name, split into the dense layers that run as stored
    (Q8_0/Q4_0, with their biases) and everything else (dequantized), each read when used."""

    def __init__(self, reader: Any, heads: tuple[int, int] | None, model: CausalLM) -> None:
        import gguf

        exact = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0)
        self.heads = heads
        self.tensors: dict[str, Any] = {}
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
            if name is not None:
                self.tensors[name] = tensor
        candidates = [
            name.removesuffix(".weight")
            for name, t in self.tensors.items()
            if name.endswith(_DENSE) and t.tensor_type in exact
        ]
        self.exact = _whole_layers(candidates, model, self.tensors)

    def quantized(self) -> Iterator[QuantizedModule]:
        for module in self.exact:
            weight = group_quantized(self.tensors[f"{module}.weight"])
            assert weight is not None
            rope_heads = _rope_heads(module + ".", self.heads)
            if rope_heads:
                weight = unpermute_group_quantized(weight, rope_heads)
            bias = self.tensors.get(f"{module}.bias")
            yield module, weight, None if bias is None else self._float(f"{module}.bias")

    def floats(self) -> Iterator[tuple[str, torch.Tensor]]:
        taken = {f"{m}.{kind}" for m in self.exact for kind in ("weight", "bias")}
        for name in self.tensors:
            if name not in taken:
                yield name, self._float(name)

    def _float(self, name: str) -> torch.Tensor:
        values = dequantized(self.tensors[name])
        rope_heads = _rope_heads(name, self.heads)
        return unpermute_rows(values, rope_heads) if rope_heads else values


def _whole_layers(modules: list[str], model: CausalLM, tensors: dict[str, Any]) -> list[str]:
    """The ``modules`` whose fused layer (q/k/v, gate/up) is in ``modules`` whole and of one
    type: a layer with a shard of another type (Q4_K_M files mix Q4_K and Q6_K) loads as float."""
    layers: dict[str, list[str]] = defaultdict(list)
    for module in modules:
        layers[fused_target(model, module)[0]].append(module)
    whole = []
    for target, shards in layers.items():
        linear = model.get_submodule(target)
        kinds = {int(tensors[f"{m}.weight"].tensor_type) for m in shards}
        if (
            isinstance(linear, Linear)
            and len(shards) == len(linear.output_sizes)
            and len(kinds) == 1
        ):
            whole.extend(shards)
    return whole


def _rope_heads(name: str, heads: tuple[int, int] | None) -> int:
    """How many heads llama.cpp permuted tensor ``name`` by (0: not permuted)."""
    if heads is None:
        return 0
    if ".q_proj." in name:
        return heads[0]
    if ".k_proj." in name:
        return heads[1]
    return 0


def _stored_quantization(reader: Any) -> str | None:
    """int8 / int4 when the file's dense layers include Q8_0 / Q4_0 ones (what a matching
    ``quantization=`` names), None for a float or K-quant file."""
    import gguf

    types = {gguf.GGMLQuantizationType(int(t.tensor_type)) for t in reader.tensors}
    if gguf.GGMLQuantizationType.Q4_0 in types:
        return "int4"
    if gguf.GGMLQuantizationType.Q8_0 in types:
        return "int8"
    return None
