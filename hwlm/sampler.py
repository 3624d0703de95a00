"""Next-token selection for a batch, in batched torch ops on whatever device the logits are on.

vLLM's order: token constraints (allowed tokens, bad words, min_tokens, logit_bias), penalties
(repetition, frequency, presence), then greedy rows take the argmax and random rows go through
temperature, min_p, top-k, top-p and sampling.

Random rows draw by inversion: one uniform u per row, and the first token (in vocabulary order)
whose cumulative probability exceeds u. That samples exactly from p with a single random number
per row, and the vocabulary order makes a row's draw independent of how its candidates were found;
a seeded request takes its u from its own generator, so its output does not depend on what else
is in the batch. Log-probabilities (of sampled tokens, of the top-N, and the ranks) are those of
the raw model distribution, before any processing.

A sequence that forked this step (parallel sampling, see ``Sequence.pending_forks``) has its logits
row repeated for each fork, so every sample draws its own first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hwlm.penalties import PenaltyTensors, apply_penalties
from hwlm.sequence import Sequence
from hwlm.token_constraints import TokenConstraints
from hwlm.truncation import truncate

_SORT_LIMIT = 1024  # more candidates than this are put in vocabulary order by a dense scatter

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
        raw = logits = logits.float()  # process_logits and sample never modify their input
        log_total = torch.logsumexp(raw, dim=-1, keepdim=True)
        logits = process_logits(logits, seqs)
        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = sample(logits, seqs)
            if any(greedy):
                mask = torch.tensor(greedy, device=logits.device)
                tokens = torch.where(mask, logits.argmax(dim=-1), tokens)
        # The sampled tokens' logprobs need one reduction, not a [batch, vocab] log_softmax.
        token_logprobs = (raw.gather(1, tokens[:, None]) - log_total).squeeze(1)
        wanted = [s.params.logprobs for s in seqs]
        top: list[TopLogprobs | None] = [None] * len(seqs)
        if any(n is not None for n in wanted):
            top = top_logprobs(raw - log_total, tokens, wanted)
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
    replaces them). Candidates are put in vocabulary order first, so a row's draw does not depend
    on how many candidates the batch's other rows needed."""
    values, ids = truncate(logits, [s.params for s in seqs])
    probs, ids = _vocabulary_order(values.softmax(dim=-1), ids, logits.shape[1])
    cdf = probs.cumsum(dim=-1)
    threshold = _uniforms(seqs, logits.device).to(cdf.dtype) * cdf[:, -1]
    pos = torch.searchsorted(cdf, threshold[:, None], right=True)[:, 0]
    pos = pos.clamp_(max=cdf.shape[1] - 1)  # u * total == total only by rounding
    return pos if ids is None else ids.gather(1, pos[:, None])[:, 0]


def _vocabulary_order(
    probs: torch.Tensor, ids: torch.Tensor | None, vocab: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidates' probabilities in token-id order: a few are sorted by id; many are scattered
    into a dense [batch, vocab] row (ids then None)."""
    if ids is None:
        return probs, None
    if ids.shape[1] <= _SORT_LIMIT:
        ids, order = ids.sort(dim=-1)
        return probs.gather(1, order), ids
    return torch.zeros(probs.shape[0], vocab, dtype=probs.dtype, device=probs.device).scatter_(
        1, ids, probs
    ), None


def sampling_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The [batch, vocab] distribution ``sample`` draws from (for inspection and tests)."""
    values, ids = truncate(logits.float(), [s.params for s in seqs])
    probs = values.softmax(dim=-1)
    return probs if ids is None else torch.zeros_like(logits).float().scatter(1, ids, probs)


def _uniforms(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    """U[0, 1) per row (float64); a seeded row's comes from its own generator."""
    u = torch.rand(len(seqs), dtype=torch.float64, device=device)
    for i, seq in enumerate(seqs):  # only seeded requests draw from their own generator
        if seq.params.seed is not None and not seq.params.greedy:
            g = _generator(seq, device)
            u[i] = torch.rand((), dtype=torch.float64, device=device, generator=g)
    return u


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
