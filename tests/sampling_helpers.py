"""Sequences and logits for sampler tests (no model needed)."""

from __future__ import annotations

import itertools

import torch

from hwlm.engine.sequence import Sequence
from hwlm.sampling_params import SamplingParams

EOS = 2
_ids = itertools.count()


def make_seq(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    bad_words: list[list[int]] | None = None,
) -> Sequence:
    seq = Sequence(next(_ids), "r", prompt or [1, 3, 4], params, None, (EOS,))
    seq.token_ids.extend(output or [])
    seq.bad_words_token_ids = bad_words or []
    return seq


def fixed_logits(batch: int, vocab: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    """Reproducible logits with both signs (so repetition_penalty's two cases are exercised)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g, dtype=torch.float64) * scale
