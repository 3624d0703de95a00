"""A Hugging Face config dict from a GGUF file's metadata (llama, qwen2, qwen3 architectures).

llama.cpp writes Llama, Mistral and their fine-tunes as ``llama``; Qwen2/2.5 as ``qwen2``;
Qwen3 as ``qwen3``. Llama 3.1-style rope scaling is read back from ``rope_freqs``
(``gguf_rope``); other rope scaling is refused in one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hwlm.models.checkpoints.gguf_rope import rope_scaling_from_freqs

# GGUF architecture -> (HF architecture, model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# GGUF general.file_type -> the dtype its float tensors are in (MOSTLY_F32, F16, BF16)
_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value (numbers, strings, lists), or ``default`` when the file lacks it."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def hf_config(reader: Any, has_output: bool, name: str) -> dict[str, Any]:
    """config.json's fields for the model in ``reader`` (a ``gguf.GGUFReader``); ``has_output``:
    whether the file has its own ``output.weight`` (else the embeddings are tied)."""
    arch = str(field(reader, "general.architecture", ""))
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF file {name} has architecture {arch!r}; hwlm reads {sorted(ARCHITECTURES)}"
        )
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear") or field(reader, f"{arch}.rope.scaling.factor"):
        raise ValueError(f"GGUF file {name}: rope scaling {scaling!r} is not supported")

    def get(key: str, default: Any = None) -> Any:
        return field(reader, f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    hf_arch, model_type = ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(get("vocab_size", len(tokens))),
        "tie_word_embeddings": not has_output,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": _FILE_DTYPES.get(int(field(reader, "general.file_type", 1)), "bfloat16"),
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        rotary_dim = int(get("rope.dimension_count", config["head_dim"]))
        divisors = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
        config["rope_scaling"] = rope_scaling_from_freqs(
            divisors, config["rope_theta"], rotary_dim, name
        )
    return config
