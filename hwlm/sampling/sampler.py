"""Next-token selection for a batch, in batched torch ops on whatever device the logits are on.

vLLM's order: the grammar's mask (structured outputs), token constraints (allowed tokens, bad
words, min_tokens, logit_bias), penalties (repetition, frequency, presence), then greedy rows take
the argmax and random rows go through temperature, min_p, top-k, top-p and sampling. The grammar's
masks are filled on the host (``hwlm.sampling.structured.bitmask``): by ``sample`` itself, once the
forward pass is queued, so on an accelerator they are computed while the device runs it; or, with
overlapped steps, by ``sample_later``, which returns ``DeferredSamples``: the masks are filled on a
thread of their own once the step before has advanced the grammars, while the engine finishes that
step and schedules and prepares the next, and the sampling is queued just before the next forward.

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

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from hwlm.engine.sequence import Sequence
from hwlm.engine.transfer import CopyAtWait, HostCopy, Transfers, to_device, using
from hwlm.sampling.penalties import PenaltyTensors, apply_penalties
from hwlm.sampling.structured.bitmask import (
    BitmaskFiller,
    MaskJob,
    StepBitmask,
    apply_bitmask,
    batch_words,
)
from hwlm.sampling.token_constraints import TokenConstraints
from hwlm.sampling.truncation import truncate

_SORT_LIMIT = 1024  # more candidates than this are put in vocabulary order by a dense scatter

TopLogprobs = tuple[list[int], list[float], int]  # (top ids, their logprobs, sampled rank)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token
    top_logprobs: list[TopLogprobs | None]
    seqs: list[Sequence]  # the sequence of each row: the sampled ones, forks included


class SampledBatch:
    """A step's samples while they are still on the device.

    ``copy`` is their copy to the host, already started (``Transfers.start_host_copy``);
    ``to_output`` waits for it. Between the two the host is free to prepare and launch the next
    step, which reads ``token_ids`` on the device (see ``hwlm.engine.llm_engine``, overlapped
    steps)."""

    def __init__(
        self,
        token_ids: torch.Tensor,
        copy: HostCopy,
        wanted: list[int | None],
        seqs: list[Sequence],
    ) -> None:
        self.token_ids = token_ids
        self.seqs = seqs
        self._wanted = wanted
        self._copy = copy

    def complete(self) -> SampledBatch:
        """Itself: its sampling is queued already (see ``DeferredSamples``)."""
        return self

    def to_output(self) -> SamplerOutput:
        tokens, logprobs, *top = (t.tolist() for t in self._copy.wait())
        rows: list[TopLogprobs | None] = [None] * len(self.seqs)
        if top:
            top_ids, top_values, ranks = top
            rows = _format_top(top_ids, top_values, ranks, self._wanted)
        return SamplerOutput(tokens, logprobs, rows, self.seqs)


@dataclass
class _Rows:
    """A batch on its way through the sampler: forks expanded, the raw float logits and their
    normaliser queued; or, for the masked greedy kernel, the logits as they came and no
    normaliser."""

    raw: torch.Tensor
    log_total: torch.Tensor | None
    seqs: list[Sequence]


class DeferredSamples:
    """A step's sampling held back until its grammars' masks are filled (overlapped steps).

    ``start_masks`` starts filling them on the mask thread, once every grammar of the batch has
    seen the tokens of the steps before; ``complete`` waits for them and queues the sampling
    (it fills them on the calling thread if they were not started). ``seqs``, ``token_ids`` and
    ``to_output`` serve as those of the ``SampledBatch`` that ``complete`` returns."""

    def __init__(self, sampler: Sampler, rows: _Rows) -> None:
        self.seqs = rows.seqs
        self._sampler = sampler
        self._rows: _Rows | None = rows
        self._job: MaskJob | None = None
        self._done: SampledBatch | None = None

    def start_masks(self) -> None:
        if self._rows is not None and self._job is None:
            self._job = self._sampler.masks.start_fill(self.seqs)

    def complete(self) -> SampledBatch:
        if self._done is None:
            rows, self._rows = self._rows, None
            assert rows is not None
            masks = self._sampler.masks
            grammar = masks.fill(rows.seqs) if self._job is None else self._job.result()
            with self._sampler._using():
                self._done = self._sampler._end(rows, grammar)
        return self._done

    @property
    def token_ids(self) -> torch.Tensor:
        return self.complete().token_ids

    def to_output(self) -> SamplerOutput:
        return self.complete().to_output()


Samples = SampledBatch | DeferredSamples


GreedyKernel = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (logits, words of the allowed tokens) -> (tokens, logprobs): ``Backend.masked_greedy_sample``
MaskedGreedyKernel = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def greedy_in_torch(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax (ties to the lowest id) and its log-probability, in float32."""
    raw = logits.float()
    tokens = raw.argmax(dim=-1)
    return tokens, raw.gather(1, tokens[:, None])[:, 0] - raw.logsumexp(dim=-1)


class Sampler:
    """``greedy`` computes argmax and log-probability for batches that need nothing else
    (``Backend.greedy_sample``: one pass over the logits on GPUs). ``transfers`` (the backend)
    makes the copies between host and device: host-built tensors go to the device through its
    ``upload`` and the samples come back through its ``start_host_copy``; without one, copies
    are plain and synchronous."""

    def __init__(
        self,
        greedy: GreedyKernel = greedy_in_torch,
        transfers: Transfers | None = None,
        masked_greedy: MaskedGreedyKernel | None = None,
    ) -> None:
        self._greedy = greedy
        self._masked_greedy = masked_greedy
        self._transfers = transfers
        # Structured outputs; its ``stats`` time the host's work.
        self.masks = BitmaskFiller(transfers)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sample(logits, seqs).to_output()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledBatch:
        """Select every row's next token without reading anything back to the host."""
        with self._using():
            if all(s.argmax_only and not s.pending_forks for s in seqs):
                tokens, token_logprobs = self._greedy(logits)
                return self._batch(tokens, [token_logprobs], [None] * len(seqs), seqs)
            rows = self._begin(logits, seqs)
            return self._end(rows, self.masks.fill(rows.seqs))

    def sample_later(self, logits: torch.Tensor, seqs: list[Sequence]) -> DeferredSamples:
        """``sample``, with the grammars' masks filled later (``DeferredSamples``). The forks
        are expanded and the logits' float copy and normaliser queued now."""
        with self._using():
            return DeferredSamples(self, self._begin(logits, seqs))

    def _using(self) -> AbstractContextManager[None]:
        return nullcontext() if self._transfers is None else using(self._transfers)

    def _begin(self, logits: torch.Tensor, seqs: list[Sequence]) -> _Rows:
        logits, seqs = _expand_forks(logits, seqs)
        if self._masked_greedy is not None and all(s.argmax_within_grammar for s in seqs):
            return _Rows(logits, None, seqs)  # one kernel reads them in their own dtype
        raw = logits.float()  # process_logits and sample never modify their input
        return _Rows(raw, torch.logsumexp(raw, dim=-1, keepdim=True), seqs)

    def _end(self, rows: _Rows, grammar: StepBitmask | None) -> SampledBatch:
        raw, log_total, seqs = rows.raw, rows.log_total, rows.seqs
        if log_total is None:  # greedy rows within their grammars, nothing else wanted
            assert self._masked_greedy is not None
            if grammar is None:
                tokens, token_logprobs = self._greedy(raw)
            else:
                words = batch_words(grammar, raw.shape[0], raw.shape[1], raw.device)
                tokens, token_logprobs = self._masked_greedy(raw, words)
            return self._batch(tokens, [token_logprobs], [None] * len(seqs), seqs)
        logits = process_logits(raw, seqs, grammar)
        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = sample(logits, seqs)
            if any(greedy):
                mask = to_device(greedy, torch.bool, logits.device)
                tokens = torch.where(mask, logits.argmax(dim=-1), tokens)
        # The sampled tokens' logprobs need one reduction, not a [batch, vocab] log_softmax.
        token_logprobs = (raw.gather(1, tokens[:, None]) - log_total).squeeze(1)
        wanted = [s.params.logprobs for s in seqs]
        results = [token_logprobs]
        if any(n is not None for n in wanted):
            results += top_logprobs(raw - log_total, tokens, wanted)
        return self._batch(tokens, results, wanted, seqs)

    def _batch(
        self,
        tokens: torch.Tensor,
        results: list[torch.Tensor],
        wanted: list[int | None],
        seqs: list[Sequence],
    ) -> SampledBatch:
        """The batch of ``tokens``, with their copy to the host (and that of ``results``: their
        logprobs, then optionally the top ids, top logprobs and ranks) started."""
        tensors, transfers = [tokens, *results], self._transfers
        copy = CopyAtWait(tensors) if transfers is None else transfers.start_host_copy(tensors)
        return SampledBatch(tokens, copy, wanted, seqs)


def process_logits(
    logits: torch.Tensor, seqs: list[Sequence], grammar: StepBitmask | None = None
) -> torch.Tensor:
    """The grammar's mask, token constraints, then penalties (nothing is done for rows that use
    none of them)."""
    if grammar is not None:
        logits = apply_bitmask(logits, grammar)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the device: the N best ids and logprobs of every row (N: the most any row wants; -1
    means the whole vocabulary) and the sampled token's rank (1 = best)."""
    vocab = raw_logprobs.shape[1]
    k = max(vocab if n == -1 else min(n or 0, vocab) for n in wanted)
    top_vals, top_ids = raw_logprobs.topk(k, dim=-1)
    chosen = raw_logprobs.gather(1, tokens[:, None])
    ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
    return top_ids, top_vals, ranks


def _format_top(
    ids_rows: list[list[int]],
    val_rows: list[list[float]],
    ranks: list[int],
    wanted: list[int | None],
) -> list[TopLogprobs | None]:
    """Per row, its own N of the best (ids, logprobs) and its rank; None where none was asked."""
    out: list[TopLogprobs | None] = []
    for ids, vals, rank, n in zip(ids_rows, val_rows, ranks, wanted, strict=True):
        if n is None:
            out.append(None)
        else:
            count = len(ids) if n == -1 else min(n, len(ids))
            out.append((ids[:count], vals[:count], int(rank)))
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
    return logits[to_device(rows, torch.int64, logits.device)], expanded


def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
    if seq.generator is None:
        seq.generator = torch.Generator(device=device)
        seq.generator.manual_seed(seq.seed or 0)
    return seq.generator
