"""Rotary position embedding (GPT-NeoX "rotate half" layout) with the scaling types that
config.json declares: default, linear, dynamic (NTK), llama3 and yarn.

Frequencies follow transformers' ``modeling_rope_utils`` so that logits match Hugging Face, except
for ``dynamic``: transformers recomputes the base for each forward from the longest sequence in the
batch, which a paged KV cache cannot do (cached keys are already rotated). Like vLLM, hwlm fixes the
base at the longest context the scaling allows, ``max_position_embeddings * factor``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hwlm.config import ModelConfig


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float, int]:
    """(inv_freq [head_size // 2], cos/sin multiplier, number of positions to cache)."""
    dim, base, max_pos = config.head_size, config.rope_theta, config.max_position_embeddings
    params = config.rope_scaling or {}
    kind = params.get("rope_type", "default")
    if kind == "default":
        return _default_inv_freq(dim, base), 1.0, max_pos
    if kind == "yarn":
        return _yarn(dim, base, max_pos, params)
    factor = float(params["factor"])
    if kind == "linear":
        return _default_inv_freq(dim, base) / factor, 1.0, int(max_pos * factor)
    if kind == "dynamic":
        max_len = int(max_pos * factor)
        base = base * ((factor * max_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(dim, base), 1.0, max_len
    if kind == "llama3":
        return _llama3_inv_freq(dim, base, factor, max_pos, params), 1.0, max_pos
    raise ValueError(
        f"unsupported rope_type {kind!r}; hwlm supports default, linear, dynamic, llama3, yarn"
    )


def _llama3_inv_freq(
    dim: int, base: float, factor: float, max_pos: int, params: dict[str, Any]
) -> torch.Tensor:
    inv_freq = _default_inv_freq(dim, base)
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params.get("original_max_position_embeddings") or max_pos)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn(
    dim: int, base: float, max_pos: int, params: dict[str, Any]
) -> tuple[torch.Tensor, float, int]:
    # transformers 5 semantics: `factor` is used as given (transformers 4 replaced it with
    # max_position_embeddings / original_max_position_embeddings when the latter was present).
    original = int(params.get("original_max_position_embeddings") or max_pos)
    factor = float(params.get("factor") or max_pos / original)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attention_factor), max(max_pos, int(original * factor))


class RotaryEmbedding(nn.Module):
    """A cos/sin table over all positions the scaling supports, looked up once per forward."""

    cos_sin: torch.Tensor  # [max_positions, head_size]: cos then sin halves

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq, attention_factor, max_positions = rope_frequencies(config)
        self.max_positions = max_positions
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
        # Multiply in float32 then round, as transformers does.
        cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
        self.register_buffer("cos_sin", torch.cat((cos, sin), dim=-1).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``positions`` [n], each [n, 1, head_size // 2] (broadcast over heads)."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [n, heads, head_size] (any strides); returns a new contiguous tensor."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    # Written into halves of one output: no temporaries and no concatenation.
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out
