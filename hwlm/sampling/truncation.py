"""Temperature, min_p, top-k and top-p for a batch (vLLM's order and definitions).

- min_p drops tokens less likely than ``min_p`` times the most likely one.
- top-k keeps the ``top_k`` best tokens; top-p then keeps, of what is left (renormalised), the
  best tokens until their mass reaches ``top_p``: a token stays while the mass of the strictly
  better ones is below ``top_p`` (the best token always stays).

Work is kept to what the batch needs: with top-k alone the candidates are found with one
``topk`` before any scaling (a positive temperature keeps the ranking). For top-p over the whole
vocabulary, the ``PREFILTER_K`` best tokens are tried first; only when some row's nucleus is not
inside them is the vocabulary sorted (as vLLM always does).
"""

from __future__ import annotations

import math

import torch

from hwlm.engine.transfer import to_device
from hwlm.sampling_params import SamplingParams

PREFILTER_K = 256


def truncate(
    logits: torch.Tensor, params: list[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidate logits (-inf where masked; temperature applied) and their token ids, best
    first; or (all scaled logits, None) when no row truncates by rank."""
    device = logits.device
    temps = to_device([max(p.temperature, 1e-5) for p in params], torch.float32, device)
    temps = temps[:, None]
    vocab = logits.shape[1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    any_top_p = any(p < 1.0 for p in top_p)
    by_rank = any_top_p or min(top_k) < vocab
    if max(top_k) < vocab and not any(p.min_p > 0 for p in params):
        values, ids = logits.topk(max(top_k), dim=-1)
        return top_k_top_p(values / temps, ids, top_k, _column(top_p, device), any_top_p)
    logits = logits / temps
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, [p.min_p for p in params])
    if not by_rank:
        return logits, None
    if max(top_k) < vocab:
        values, ids = logits.topk(max(top_k), dim=-1)
        return top_k_top_p(values, ids, top_k, _column(top_p, device), any_top_p)
    found = _prefiltered_nucleus(logits, top_k, top_p)
    if found is not None:
        return found
    values, ids = logits.sort(dim=-1, descending=True)
    return top_k_top_p(values, ids, top_k, _column(top_p, device), any_top_p)


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Mask tokens with probability below min_p times the top probability. In logit space:
    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)."""
    log_min_p = [math.log(m) if m > 0 else -math.inf for m in min_p]
    log_min_p_column = to_device(log_min_p, torch.float32, logits.device)[:, None]
    threshold = logits.max(dim=-1, keepdim=True).values + log_min_p_column
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_k_top_p(
    values: torch.Tensor,
    ids: torch.Tensor,
    top_k: list[int],
    top_p: torch.Tensor,
    filter_top_p: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` are candidate logits, best first, with token ids ``ids``. Entries past a row's
    top_k, then past its top_p mass (``top_p`` [batch], relative to the candidates' mass), are
    set to -inf. ``filter_top_p`` False (no row has top_p < 1, as the caller knows from the
    host-side parameters) skips the top-p pass."""
    device = values.device
    ranks = torch.arange(values.shape[1], device=device)[None, :]
    k = to_device(top_k, torch.int64, device)[:, None]
    values = values.masked_fill(ranks >= k, float("-inf"))
    if filter_top_p:
        probs = values.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
        values = values.masked_fill((mass_before >= top_p[:, None]) & (ranks > 0), float("-inf"))
    return values, ids


def _prefiltered_nucleus(
    logits: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """top-k/top-p decided inside the PREFILTER_K best tokens, or None when some row needs more.

    A row limited by top_k <= PREFILTER_K is decided there. A row with no top-k limit is decided
    there when those tokens hold at least ``top_p`` of its mass (every token outside has at
    least that much mass before it); its threshold, relative to the candidates' mass m, is
    ``top_p / m``."""
    vocab = logits.shape[1]
    k = min(PREFILTER_K, vocab)
    if k == vocab or any(k < kk < vocab for kk in top_k):
        return None
    values, ids = logits.topk(k, dim=-1)
    covered = (values - logits.logsumexp(dim=-1, keepdim=True)).exp().sum(dim=-1)
    unlimited = to_device([kk == vocab for kk in top_k], torch.bool, logits.device)
    p = _column(top_p, logits.device)
    # An untruncated row (top_p 1, no top_k) needs every token: never decided here.
    needed = torch.where(unlimited, torch.where(p < 1.0, p, 2.0), 0.0)
    if bool((covered < needed).any()):
        return None
    relative_p = torch.where(unlimited, p / covered, p)
    return top_k_top_p(values, ids, [min(kk, k) for kk in top_k], relative_p)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)
