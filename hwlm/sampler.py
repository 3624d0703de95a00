"""Next-token selection for a batch, in batched torch ops on whatever device the logits are on.

vLLM's order: token constraints (allowed tokens, bad words, min_tokens, logit_bias), penalties
(repetition, frequency, presence), then greedy rows take the argmax and random rows go through
temperature, min_p, top-k, top-p and sampling.

Random rows draw by the exponential race (argmax of p / E with E ~ Exp(1)), which samples exactly
from p. A seeded request draws its noise over the whole vocabulary from its own generator, so its
output does not depend on what else is in the batch. Log-probabilities (of sampled tokens, of the
top-N, and the ranks) are those of the raw model distribution, before any processing.

A sequence that forked this step (parallel sampling, see ``Sequence.pending_forks``) has its logits
row repeated for each fork, so every sample draws its own first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hwlm.penalties import PenaltyTensors, apply_penalties
from hwlm.sequence import Sequence
from hwlm.token_constraints import TokenConstraints

TopLogprobs = tuple[list[int], list[float], int]  # (top ids, their logprobs, sampled rank)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token
    top_logprobs: list[TopLogprobs | None]
    seqs: list[Sequence]  # the sequence of each row: the sampled ones, forks included


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        logits, seqs = _expand_forks(logits, seqs)
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = process_logits(logits, seqs)
        tokens = logits.argmax(dim=-1)
        greedy = [s.params.greedy for s in seqs]
        if not all(greedy):
            sampled = sample(logits, seqs)
            if any(greedy):
                mask = torch.tensor(greedy, device=logits.device)
                sampled = torch.where(mask, tokens, sampled)
            tokens = sampled
        token_logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        top = top_logprobs(raw_logprobs, tokens, [s.params.logprobs for s in seqs])
        return SamplerOutput(tokens.tolist(), token_logprobs.tolist(), top, seqs)


def process_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Token constraints, then penalties (nothing is done for rows that use neither)."""
    constraints = TokenConstraints.build(seqs)
    if constraints is not None:
        logits = constraints.apply(logits)
    penalties = PenaltyTensors.build(seqs, logits.shape[1], logits.device)
    if penalties is not None:
        logits = apply_penalties(logits, penalties)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One draw per row from its truncated distribution (greedy rows are drawn too; the caller
    replaces them)."""
    values, ids = truncate(logits, seqs)
    noise = _noise(seqs, values.shape, logits.shape[1], logits.device, ids)
    choice = (values.softmax(dim=-1) / noise).argmax(dim=-1)
    return choice if ids is None else ids.gather(1, choice[:, None])[:, 0]


def sampling_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The [batch, vocab] distribution ``sample`` draws from (for inspection and tests)."""
    values, ids = truncate(logits.float(), seqs)
    probs = values.softmax(dim=-1)
    return probs if ids is None else torch.zeros_like(logits).float().scatter(1, ids, probs)


def truncate(
    logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, min_p, top-k, top-p. Returns candidate logits (-inf where masked) and their
    token ids, or (all logits, None) when no row truncates by rank."""
    device = logits.device
    params = [s.params for s in seqs]
    temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)
    logits = logits / temps[:, None]
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, [p.min_p for p in params])
    vocab = logits.shape[1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    if any(p.top_p < 1.0 for p in params) or min(top_k) < vocab:
        return top_k_top_p(logits, top_k, [p.top_p for p in params])
    return logits, None


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Mask tokens with probability below min_p times the top probability. In logit space:
    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)."""
    log_min_p = torch.tensor([math.log(m) if m > 0 else -math.inf for m in min_p])
    threshold = logits.max(dim=-1, keepdim=True).values + log_min_p.to(logits.device)[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_k_top_p(
    logits: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max(top_k)`` best logits of each row, best first, with their token ids; entries past
    a row's own top_k, then past its top_p mass (of the top-k renormalised distribution; the
    best token always stays), are -inf."""
    device = logits.device
    values, ids = logits.topk(max(top_k), dim=-1)
    ranks = torch.arange(values.shape[1], device=device)[None, :]
    k = torch.tensor(top_k, device=device)[:, None]
    values = values.masked_fill(ranks >= k, float("-inf"))
    if any(p < 1.0 for p in top_p):
        probs = values.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
        p = torch.tensor(top_p, device=device)[:, None]
        values = values.masked_fill((mass_before >= p) & (ranks > 0), float("-inf"))
    return values, ids


def _noise(
    seqs: list[Sequence],
    shape: torch.Size,
    vocab: int,
    device: torch.device,
    ids: torch.Tensor | None,
) -> torch.Tensor:
    """Exp(1) noise per candidate. A seeded row draws one value per vocabulary entry from its own
    generator and picks those of its candidates (``ids``), whatever the batch's candidate count."""
    noise = torch.empty(shape, device=device).exponential_()
    for i, seq in enumerate(seqs):  # only seeded requests draw from their own generator
        if seq.params.seed is not None and not seq.params.greedy:
            row = torch.empty(vocab, device=device).exponential_(generator=_generator(seq, device))
            noise[i] = row if ids is None else row[ids[i]]
    return noise


def top_logprobs(
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, wanted: list[int | None]
) -> list[TopLogprobs | None]:
    """Per row: the N best (ids, logprobs) and the sampled token's rank (1 = best); N = -1 means
    the whole vocabulary; None where no logprobs were asked for."""
    if all(n is None for n in wanted):
        return [None] * len(wanted)
    vocab = raw_logprobs.shape[1]
    counts = [vocab if n == -1 else min(n or 0, vocab) for n in wanted]
    k = max(counts)
    top_vals, top_ids = raw_logprobs.topk(k, dim=-1)
    chosen = raw_logprobs.gather(1, tokens[:, None])
    ranks = ((raw_logprobs > chosen).sum(dim=-1) + 1).tolist()
    ids_rows, val_rows = top_ids.tolist(), top_vals.tolist()
    out: list[TopLogprobs | None] = []
    for i, (n, count) in enumerate(zip(wanted, counts, strict=True)):
        if n is None:
            out.append(None)
        else:
            out.append((ids_rows[i][:count], val_rows[i][:count], int(ranks[i])))
    return out


def _expand_forks(
    logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[torch.Tensor, list[Sequence]]:
    if not any(s.pending_forks for s in seqs):
        return logits, seqs
    rows: list[int] = []
    expanded: list[Sequence] = []
    for i, seq in enumerate(seqs):
        for member in (seq, *seq.pending_forks):
            rows.append(i)
            expanded.append(member)
    return logits[torch.tensor(rows, device=logits.device)], expanded


def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
    if seq.generator is None:
        seq.generator = torch.Generator(device=device)
        seq.generator.manual_seed(seq.seed or 0)
    return seq.generator
