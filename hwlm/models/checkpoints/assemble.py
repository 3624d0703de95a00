"""Putting pre-quantized weights into a model's ``Linear`` layers.

A checkpoint names one module per projection (``...q_proj``); the model fuses some of them
(``CausalLM.packed_modules``: q/k/v, gate/up), so shards are collected until a fused layer has
all of them, stacked along the output, and handed to the backend once
(``Linear.load_prequantized``). What the layers took is then skipped by ``load_weights``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from hwlm.backend import Backend
from hwlm.models import CausalLM
from hwlm.models.checkpoints.formats import QuantizedFormat
from hwlm.models.checkpoints.stacking import stack_shards
from hwlm.models.checkpoints.tensors import CheckpointTensors
from hwlm.models.layers import Linear
from hwlm.models.quantized_weight import GroupQuantizedWeight, PrequantizedWeight

logger = logging.getLogger(__name__)

QuantizedModule = tuple[str, PrequantizedWeight, torch.Tensor | None]  # (name, weight, bias)


def read_quantized(
    tensors: CheckpointTensors, fmt: QuantizedFormat, consumed: set[str]
) -> Iterator[QuantizedModule]:
    """Each module the checkpoint stores quantized, converted; adds the names it read (the
    module's tensors and its bias) to ``consumed``."""
    seen: set[str] = set()
    for name in tensors.names:
        module, _, suffix = name.rpartition(".")
        if suffix not in fmt.markers or module in seen:
            continue
        seen.add(module)
        parts = {}
        for part in fmt.suffixes:
            if f"{module}.{part}" in tensors:
                parts[part] = tensors.get(f"{module}.{part}")
                consumed.add(f"{module}.{part}")
        bias = None
        if f"{module}.bias" in tensors:
            bias = tensors.get(f"{module}.bias")
            consumed.add(f"{module}.bias")
        yield module, fmt.convert(module, parts), bias


def attach_prequantized(
    model: CausalLM, backend: Backend, modules: Iterable[QuantizedModule], method: str
) -> int:
    """Give each fused ``Linear`` of ``model`` its pre-quantized weights, as soon as all of its
    shards have come; returns how many layers were loaded. ValueError (one line) for a module
    the model does not have, a shape that does not match, or a fused layer left incomplete."""
    pending: dict[str, dict[int, tuple[PrequantizedWeight, torch.Tensor | None]]] = {}
    count = 0
    for module, weight, bias in modules:
        target, shard = fused_target(model, module)
        linear = model.get_submodule(target)
        assert isinstance(linear, Linear)
        shards = pending.setdefault(target, {})
        shards[shard] = (weight, bias)
        if len(shards) == len(linear.output_sizes):
            _load(model, backend, linear, target, [shards[i] for i in sorted(shards)], method)
            del pending[target]
            count += 1
    if pending:
        names = ", ".join(sorted(pending)[:4])
        raise ValueError(f"checkpoint stores only some projections of {names} quantized")
    logger.info("loaded %d pre-quantized dense layers (%s)", count, method)
    return count


def fused_target(model: CausalLM, module: str) -> tuple[str, int]:
    """(the model's Linear, the shard index in it) for checkpoint module ``module``; ValueError
    (one line) when the model has no such dense layer."""
    name = model._param_name(module + ".weight")
    if name is None:
        raise ValueError(f"checkpoint module {module} is stored quantized but the model ties it")
    shard = 0
    for src, (dst, idx) in model.packed_modules.items():
        if src in name:
            name, shard = name.replace(src, dst), idx
            break
    target = name.rpartition(".")[0]
    try:
        linear = model.get_submodule(target)
    except AttributeError:
        linear = None
    if not isinstance(linear, Linear):
        raise ValueError(
            f"checkpoint module {module} is not a dense layer of {model.config.architecture}"
        )
    return target, shard


def _load(
    model: CausalLM,
    backend: Backend,
    linear: Linear,
    name: str,
    shards: list[tuple[PrequantizedWeight, torch.Tensor | None]],
    method: str,
) -> None:
    weight = stack_shards([w for w, _ in shards], name)
    shape = _shape(weight)
    expected = (sum(linear.output_sizes), int(linear.weight.shape[1]))
    if shape != expected:
        raise ValueError(
            f"quantized weight {name} has shape {shape} in the checkpoint but {expected} in the "
            "model; does config.json match the weights?"
        )
    linear.load_prequantized(backend, weight, _bias(linear, shards, name), method)
    if linear is model.lm_head:
        model.logits_kernel = linear.kernel


def _bias(
    linear: Linear, shards: list[tuple[PrequantizedWeight, torch.Tensor | None]], name: str
) -> torch.Tensor | None:
    biases = [b for _, b in shards]
    if linear.bias is None:
        # GPTQ writes an all-zero bias for every layer; anything else is a mismatch.
        if any(b is not None and bool(b.any()) for b in biases):
            raise ValueError(f"checkpoint has a bias for {name}, which the model does not have")
        return None
    if any(b is None for b in biases):
        raise ValueError(f"checkpoint lacks the bias of {name}")
    return torch.cat([b for b in biases if b is not None]).to(linear.bias.dtype)


def _shape(weight: PrequantizedWeight) -> tuple[int, int]:
    values = weight.codes if isinstance(weight, GroupQuantizedWeight) else weight.weight
    return int(values.shape[0]), int(values.shape[1])


def load_quantized_checkpoint(
    model: CausalLM, backend: Backend, files: list[Path], fmt: QuantizedFormat
) -> None:
    """Fill ``model`` from a Hugging Face checkpoint in ``fmt``: its quantized modules through
    ``attach_prequantized``, every other tensor through ``load_weights``."""
    tensors = CheckpointTensors(files)
    consumed: set[str] = set()
    attach_prequantized(model, backend, read_quantized(tensors, fmt, consumed), fmt.name)
    model.load_weights((n, tensors.get(n)) for n in tensors.names if n not in consumed)
