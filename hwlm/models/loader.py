"""Finding a model (local folder, shipped preset, or Hugging Face hub id) and loading its weights.

``resolve_model`` decides where config, weights and tokenizer come from; ``load_model`` builds the
model and fills it from the checkpoint (``*.safetensors``, else ``*.bin``) or with random weights
(``load_format="dummy"``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hwlm import presets
from hwlm.backend import Backend
from hwlm.config import ModelConfig
from hwlm.distributed.parallel_state import ParallelGroup
from hwlm.models import CausalLM, build_model
from hwlm.models.checkpoints.assemble import load_quantized_checkpoint
from hwlm.models.checkpoints.formats import check_requested, detect_format
from hwlm.models.checkpoints.gguf_model import is_gguf, load_gguf_model, resolve_gguf
from hwlm.models.quantization import check_quantization, quantize_model
from hwlm.presets import preset_tokenizers

logger = logging.getLogger(__name__)

# "auto": safetensors, else .bin; "safetensors" / "pt": only that kind; "dummy": random weights.
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
# Mistral repos ship the weights twice (consolidated.safetensors in mistral's own layout).
_NOT_WEIGHTS = ("consolidated", "training_args")


@dataclass
class ResolvedModel:
    hf_config: dict[str, Any]  # the config.json dict
    weights_path: str | None  # folder holding the checkpoint; None = no checkpoint (random weights)
    tokenizer_path: str  # folder, or a hub id for a tokenizer that is not local yet
    name: str = ""  # what was asked for, for messages


def resolve_model(model: str, load_format: str = "auto") -> ResolvedModel:
    """Where ``model`` comes from, in this order: an existing local folder with config.json; a
    preset name or its hub id (config shipped with hwlm); a missing path (ValueError); otherwise
    a hub id, fetched with ``huggingface_hub.snapshot_download`` (honours the HF cache and
    HF_HUB_OFFLINE). Raises ValueError with a one-line reason when the model cannot be found.

    A preset's weights are random under ``load_format="dummy"``. Under ``"auto"`` they are read
    from the local HF cache, or downloaded when the hub id itself was given; a short preset name
    with no cached weights is an error, except for the built-in ``hwlm-tiny``, which has no
    weights and is always random.
    """
    _check_load_format(load_format)
    path = Path(model).expanduser()
    if is_gguf(path) and path.is_file():
        return resolve_gguf(path, model)
    if path.is_dir() and (path / "config.json").is_file():
        return _from_folder(path, model)
    preset = presets.find_preset(model)
    if preset is not None:
        return _from_preset(preset, model, load_format)
    if path.exists():
        raise ValueError(f"model path '{model}' is not a folder with a config.json")
    if model.startswith(("/", ".", "~")) or model.count(os.sep) >= 2:
        raise ValueError(f"model path '{model}' does not exist")
    return _from_hub(model, load_format)


def load_model(
    resolved: ResolvedModel,
    model_config: ModelConfig,
    backend: Backend,
    dtype: torch.dtype,
    load_format: str = "auto",
    seed: int = 0,
    quantization: str | None = None,
    parallel: ParallelGroup | None = None,
) -> CausalLM:
    """Build the model on the backend's device in ``dtype`` and fill its weights: from the
    checkpoint in ``resolved.weights_path``, or random (seeded with ``seed``) when the format is
    "dummy" or there is no checkpoint; then, with ``quantization``, quantize its dense layers
    (``hwlm.models.quantization``). Raises ValueError when the checkpoint is missing or does
    not match the config, or the backend cannot run ``quantization``."""
    _check_load_format(load_format)
    dummy = load_format == "dummy" or resolved.weights_path is None
    gguf = not dummy and is_gguf(resolved.weights_path or "")
    fmt = None if dummy or gguf else detect_format(resolved.hf_config)
    if (gguf or fmt is not None) and parallel is not None and parallel.size > 1:
        raise ValueError(
            "pre-quantized checkpoints (AWQ, GPTQ, fp8, GGUF) cannot be split over "
            "tensor-parallel ranks yet; use tensor_parallel_size 1"
        )
    if gguf:
        return load_gguf_model(resolved, model_config, backend, dtype, quantization)
    if fmt is not None:  # already quantized: a matching setting is what it stores anyway
        check_requested(quantization, fmt.quantization, fmt.name)
        quantization = None
    check_quantization(quantization, backend)
    model = build_model(model_config, backend, dtype, parallel)  # parallel: this rank's shard
    with torch.no_grad():
        if dummy or resolved.weights_path is None:
            init_dummy_weights(model, seed)
            return _quantized(model, backend, quantization).eval()
        files = weight_files(Path(resolved.weights_path), load_format)
        if not files:
            kinds = {"safetensors": "*.safetensors", "pt": "*.bin"}
            raise ValueError(
                f"no weights ({kinds.get(load_format, '*.safetensors or *.bin')}) found in "
                f"'{resolved.weights_path}' for model '{resolved.name or resolved.weights_path}'"
            )
        start = time.perf_counter()
        if fmt is None:
            model.load_weights(iter_weights(files))
        else:
            load_quantized_checkpoint(model, backend, files, fmt)
    logger.info(
        "loaded %d weight file(s) from %s in %.1f s",
        len(files),
        resolved.weights_path,
        time.perf_counter() - start,
    )
    return _quantized(model, backend, quantization).eval()


def _quantized(model: CausalLM, backend: Backend, quantization: str | None) -> CausalLM:
    if quantization is not None:
        with torch.no_grad():
            quantize_model(model, backend, quantization)
    return model


def init_dummy_weights(model: CausalLM, seed: int = 0) -> None:
    """Random weights: normal(0, initializer_range or 0.02) matrices, norm weights 1, biases 0."""
    hf = model.config.hf
    std = float(hf.get("initializer_range") or hf.get("init_std") or 0.02)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)


def weight_files(folder: Path, load_format: str = "auto") -> list[Path]:
    """The checkpoint files in ``folder``: safetensors (via the shard index when there is one),
    else PyTorch ``.bin`` files; empty when there are none."""
    kinds = [
        ("safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("pt", "pytorch_model.bin.index.json", "*.bin"),
    ]
    for kind, index_name, pattern in kinds:
        if load_format not in ("auto", kind):
            continue
        index = folder / index_name
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [folder / shard for shard in shards]
        files = sorted(p for p in folder.glob(pattern) if not p.name.startswith(_NOT_WEIGHTS))
        if files:
            return files
    return []


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of all checkpoint files, one file in memory at a time."""
    from safetensors import safe_open

    for file in tqdm(files, desc="Loading weights", unit="file", disable=len(files) <= 1):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def _check_load_format(load_format: str) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {LOAD_FORMATS}")


def _from_folder(folder: Path, name: str) -> ResolvedModel:
    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            hf_config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read config.json of model '{name}': {exc}") from exc
    return ResolvedModel(hf_config, str(folder), str(folder), name)


def _from_preset(preset: presets.Preset, name: str, load_format: str) -> ResolvedModel:
    cached = _cached_snapshot(preset.hub_id) if preset.hub_id else None
    if load_format == "dummy" or preset.name == presets.TINY_MODEL:
        # Offline: a tokenizer built for the preset's whole vocabulary (pass one for the real).
        tokenizer = cached or preset_tokenizers.tokenizer_path(preset.name)
        return ResolvedModel(preset.config, None, str(tokenizer), name)
    if cached is not None:
        logger.info("using the cached Hugging Face snapshot of %s: %s", preset.hub_id, cached)
        return _from_folder(cached, name)
    if preset.hub_id and "/" in name:
        return _from_hub(preset.hub_id, load_format)
    where = f", or the hub id '{preset.hub_id}' to download them" if preset.hub_id else ""
    raise ValueError(
        f"'{name}' is a preset that ships only a config; its weights must come from a local "
        f"folder or the hub: pass a local folder{where}, or use load_format='dummy' for random "
        "weights"
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of a cached hub snapshot holding config and weights, without any network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid id or an unreadable cache just means "not cached"
        return None
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    return folder if weight_files(folder) else None


def _from_hub(repo_id: str, load_format: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    weights = {"auto": "*.safetensors", "safetensors": "*.safetensors", "pt": "*.bin"}
    patterns = [p for p in HUB_PATTERNS if p != "*.safetensors"]
    if load_format in weights:
        patterns.append(weights[load_format])
    ignore = [f"{prefix}*" for prefix in _NOT_WEIGHTS]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore))
        if load_format == "auto" and not weight_files(folder):  # a repo with .bin files only
            folder = Path(
                snapshot_download(repo_id, allow_patterns=["*.bin"], ignore_patterns=ignore)
            )
    except Exception as exc:
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        if "/" not in repo_id:  # a bare name is more likely a mistyped preset than a hub id
            raise ValueError(
                f"unknown model '{repo_id}': no such folder or preset ({presets.preset_hint(repo_id)})"
                f", and the Hugging Face hub could not provide it ({cause[:200]})"
            ) from exc
        raise ValueError(
            f"cannot get model '{repo_id}' from the Hugging Face hub: {cause[:400]}"
        ) from exc
    if not (folder / "config.json").is_file():
        raise ValueError(f"model '{repo_id}' on the Hugging Face hub has no config.json")
    return _from_folder(folder, repo_id)
