"""Tiny random-weight Hugging Face models, saved with save_pretrained, for tests.

Each folder also gets hwlm's built-in tokenizer (vocabulary 1024), so it is a complete model
folder that both transformers and hwlm load.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "hwlm" / "presets" / "tokenizer"
VOCAB = 1024
EOS = 2  # <|im_end|> in the built-in tokenizer

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    eos_token_id=EOS,
    bos_token_id=0,
    pad_token_id=0,
    tie_word_embeddings=False,
)

# Big enough an init that greedy choices are not near-ties between batched and unbatched math.
_INIT = 0.2

ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        dict(
            intermediate_size=128, num_key_value_heads=2, initializer_range=_INIT, rms_norm_eps=1e-6
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            intermediate_size=128,
            num_key_value_heads=1,
            initializer_range=_INIT,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            intermediate_size=128,
            num_key_value_heads=2,
            initializer_range=_INIT,
            use_sliding_window=False,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(intermediate_size=128, num_key_value_heads=2, head_dim=32, initializer_range=_INIT),
    ),
    "opt": (
        "OPTConfig",
        dict(
            ffn_dim=128,
            word_embed_proj_dim=64,
            init_std=_INIT,
            do_layer_norm_before=True,
            tie_word_embeddings=True,
        ),
    ),
}

_MODEL_CLASSES = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "OPTConfig": "OPTForCausalLM",
}


def build_tiny_model(arch: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Any:
    """Create, save (safetensors + tokenizer) and return a tiny random HF model in float32."""
    import transformers

    config_name, extra = ARCHS[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, _MODEL_CLASSES[config_name])(config).float().eval()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, folder / item.name)
    return model


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy generate for one prompt, EOS ignored; tokens and their logprobs."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].double(), dim=-1)[tok].item()
        for step, tok in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs
