"""Model and engine configuration.

`ModelConfig` is parsed from a Hugging Face ``config.json`` dict directly (not through
transformers' config classes), so hwlm reads the same fields whatever transformers version is
installed: transformers 4 writes ``rope_theta``/``rope_scaling``, transformers 5 writes
``rope_parameters``; both are understood.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from hwlm.engine_args import arg_default

logger = logging.getLogger(__name__)

# Set to 1 to allow a max_model_len above the model's limit (vLLM: VLLM_ALLOW_LONG_MAX_MODEL_LEN).
ALLOW_LONG_MAX_MODEL_LEN_ENV = "HWLM_ALLOW_LONG_MAX_MODEL_LEN"

# Hugging Face architecture name -> hwlm model family.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "OPTForCausalLM": "opt",
}

# Per-family default of tie_word_embeddings when config.json leaves it out.
_TIED_BY_DEFAULT = {"llama": False, "qwen2": False, "qwen3": False, "opt": True}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


# The cache element type of each ``kv_cache_dtype`` but "auto" (which is the model's dtype).
_KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}


def kv_cache_torch_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type for the setting ``kv_cache_dtype`` and the model's ``dtype``."""
    if kv_cache_dtype == "auto":
        return dtype
    if kv_cache_dtype not in _KV_CACHE_DTYPES:
        raise ValueError(
            f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected auto or one of "
            f"{', '.join(_KV_CACHE_DTYPES)}"
        )
    return _KV_CACHE_DTYPES[kv_cache_dtype]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ('float32', 'bfloat16', 'half', ...) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[key]


@dataclass
class ModelConfig:
    """What the engine needs to know about a model, independent of its weights."""

    architecture: str  # the Hugging Face name, e.g. "LlamaForCausalLM"
    family: str  # "llama", "qwen2", "qwen3" or "opt"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    dtype: torch.dtype  # the checkpoint's dtype (config.json), before any override
    eos_token_ids: list[int]
    bos_token_id: int | None
    hf: dict[str, Any] = field(repr=False)  # the raw config.json, for family-specific fields

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unknown architecture {archs or hf.get('model_type')!r}; "
                f"hwlm supports {sorted(ARCHITECTURES)}"
            )
        family = ARCHITECTURES[arch]
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_size = int(hf.get("head_dim") or hidden // num_heads)
        theta, scaling = _rope_settings(hf)
        eos = hf.get("eos_token_id")
        eos_ids = (
            [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        )
        tie = hf.get("tie_word_embeddings")
        dtype_name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_size=head_size,
            intermediate_size=int(hf.get("intermediate_size") or hf.get("ffn_dim") or 4 * hidden),
            max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
            norm_eps=float(hf.get("rms_norm_eps") or hf.get("layer_norm_eps") or 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=_TIED_BY_DEFAULT[family] if tie is None else bool(tie),
            dtype=parse_dtype(dtype_name),
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            hf=hf,
        )

    @property
    def max_context_len(self) -> int:
        """The most positions the model covers (vLLM's derived max_model_len, and the length of
        hwlm's rotary table): max_position_embeddings, stretched by linear and dynamic rope
        scaling's factor, and for yarn the original length times the factor if that is longer."""
        params = self.rope_scaling or {}
        kind = params.get("rope_type", "default")
        if kind in ("linear", "dynamic"):
            return int(self.max_position_embeddings * float(params["factor"]))
        if kind == "yarn":
            original = int(params.get("original_max_position_embeddings") or 0)
            original = original or self.max_position_embeddings
            factor = float(params.get("factor") or self.max_position_embeddings / original)
            return max(self.max_position_embeddings, int(original * factor))
        return self.max_position_embeddings

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * itemsize


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, scaling dict or None) from either config style."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type == "default" else {**params, "rope_type": rope_type}
        return theta, scaling
    theta = float(hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
    return theta, scaling or None


def resolve_max_model_len(requested: int | None, model: ModelConfig) -> int:
    """The engine's context length: ``requested``, or the model's max_position_embeddings when
    None. Above the model's limit (``max_context_len``) it is a ValueError, as in vLLM, unless
    HWLM_ALLOW_LONG_MAX_MODEL_LEN=1: then only a warning (positions past the limit may give
    wrong outputs or fail)."""
    if requested is None:
        return model.max_position_embeddings
    limit = model.max_context_len
    if requested <= limit:
        return requested
    if os.environ.get(ALLOW_LONG_MAX_MODEL_LEN_ENV, "").strip().lower() in ("1", "true"):
        logger.warning(
            "max_model_len %d is above the model's limit of %d tokens (%s=1): positions past it "
            "may give wrong outputs or fail",
            requested,
            limit,
            ALLOW_LONG_MAX_MODEL_LEN_ENV,
        )
        return requested
    source = "max_position_embeddings"
    if limit != model.max_position_embeddings:
        source += f" {model.max_position_embeddings} with rope scaling"
    raise ValueError(
        f"max_model_len {requested} is above the model's limit of {limit} tokens ({source}); "
        f"set {ALLOW_LONG_MAX_MODEL_LEN_ENV}=1 to allow it anyway"
    )


@dataclass
class EngineConfig:
    """The engine's resolved settings: built by ``LLMEngine`` from ``EngineArgs`` (whose
    defaults these are, for code that builds one directly), the model and the backend."""

    max_model_len: int
    max_num_seqs: int = arg_default("max_num_seqs")
    max_num_batched_tokens: int = 8192  # the server's budget; LLMEngine picks one per device
    block_size: int = arg_default("block_size")
    enable_prefix_caching: bool = arg_default("enable_prefix_caching")
    memory_utilization: float = arg_default("memory_utilization")
    num_kv_blocks: int | None = arg_default("num_kv_blocks")
    seed: int = arg_default("seed")
    enforce_eager: bool = arg_default("enforce_eager")  # True: no CUDA graphs
    scheduling_policy: str = arg_default("scheduling_policy")
    max_request_share: float = arg_default("max_request_share")
    kv_cache_dtype: str = arg_default("kv_cache_dtype")  # auto: the model's dtype

    def __post_init__(self) -> None:
        _require(
            self.scheduling_policy in ("fcfs", "priority"),
            f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}",
        )
        _require(
            0.0 < self.max_request_share <= 1.0,
            f"max_request_share must be in (0, 1], got {self.max_request_share}",
        )
        _require(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _require(self.max_model_len >= 1, f"max_model_len must be >= 1, got {self.max_model_len}")
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _require(
            self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}",
        )
        _require(
            0.0 < self.memory_utilization <= 1.0,
            f"memory_utilization must be in (0, 1], got {self.memory_utilization}",
        )
        _require(
            self.kv_cache_dtype == "auto" or self.kv_cache_dtype in _KV_CACHE_DTYPES,
            f"kv_cache_dtype must be auto or one of {', '.join(_KV_CACHE_DTYPES)}, got "
            f"{self.kv_cache_dtype!r}",
        )
        if self.num_kv_blocks is not None:
            _require(
                self.num_kv_blocks >= 1, f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}"
            )

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
