"""Next-token selection for a batch, in batched torch ops on whatever device the logits are on.

Order, as in vLLM: temperature, min_p, top-k, top-p, then sampling. Greedy rows take the argmax.
Random rows draw by the exponential race (argmax of p / E with E ~ Exp(1)), which samples exactly
from p and lets a seeded request draw its noise from its own generator, so its output does not
depend on what else is in the batch. Log-probabilities are those of the raw model distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hwlm.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token
    top_logprobs: list[tuple[list[int], list[float], int] | None]  # (ids, logprobs, sampled rank)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        params = [s.params for s in seqs]
        logits = _mask_stops_before_min_tokens(logits, seqs)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        if bool(greedy.all()):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.where(greedy, logits.argmax(dim=-1), self._sample(logits, seqs))
        token_logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        top = self._top_logprobs(raw_logprobs, tokens, seqs)
        return SamplerOutput(tokens.tolist(), token_logprobs.tolist(), top)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        params = [s.params for s in seqs]
        temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)
        logits = logits / temps[:, None]
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)
            probs = logits.softmax(dim=-1)
            threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = _apply_top_k_top_p(logits, params)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, seq in enumerate(seqs):  # only seeded requests draw from their own generator
            if seq.params.seed is not None:
                noise[i].exponential_(generator=_generator(seq, device))
        return (probs / noise).argmax(dim=-1)

    def _top_logprobs(
        self, raw_logprobs: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
    ) -> list[tuple[list[int], list[float], int] | None]:
        wanted = [s.params.logprobs for s in seqs]
        if all(n is None for n in wanted):
            return [None] * len(seqs)
        k = max(n or 0 for n in wanted)
        top_vals, top_ids = raw_logprobs.topk(k, dim=-1) if k else (None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None])
        ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
        out: list[tuple[list[int], list[float], int] | None] = []
        for i, n in enumerate(wanted):
            if n is None:
                out.append(None)
            elif n == 0 or top_ids is None or top_vals is None:
                out.append(([], [], int(ranks[i])))
            else:
                out.append((top_ids[i, :n].tolist(), top_vals[i, :n].tolist(), int(ranks[i])))
        return out


def _mask_stops_before_min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows: list[int] = []
    cols: list[int] = []
    for i, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            stops = [*seq.eos_token_ids, *(seq.params.stop_token_ids or ())]
            rows.extend([i] * len(stops))
            cols.extend(stops)
    if not rows:
        return logits
    logits = logits.clone()
    logits[rows, cols] = float("-inf")
    return logits


def _apply_top_k_top_p(logits: torch.Tensor, params: list) -> torch.Tensor:
    vocab = logits.shape[-1]
    device = logits.device
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    if seq.params.seed is None:
        return None
    if seq.generator is None:
        seq.generator = torch.Generator(device=device)
        seq.generator.manual_seed(seq.params.seed)
    return seq.generator
