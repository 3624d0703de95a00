"""A step's token bitmask: filled on the host for the rows a grammar constrains, applied to the
logits on their device in one batched masking.

Bit ``j`` of int32 word ``w`` of a row allows token ``32 * w + j`` (llguidance's layout). The
host fills only the constrained rows, in parallel across CPU cores (``LLExecutor``, which
releases the GIL), while the device still runs the step's forward pass: the sampler is called
after the forward is queued, and it fills the mask before queueing anything that needs it.
``MaskStats`` also counts the engine's grammar advances (``advance.advance_grammars``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hwlm.engine.transfer import Transfers, to_device
from hwlm.sampling.structured.library import executor

if TYPE_CHECKING:
    from hwlm.engine.sequence import Sequence


@dataclass
class MaskStats:
    """Host time spent on grammars, for benchmarks (``hwlm bench throughput``): filling masks,
    and advancing the matchers over the sampled tokens."""

    steps: int = 0  # steps that filled a mask
    rows: int = 0  # masks filled
    seconds: float = 0.0  # filling masks
    advance_steps: int = 0  # steps that advanced matchers
    advance_seconds: float = 0.0

    def add_advance(self, seconds: float) -> None:
        self.advance_steps += 1
        self.advance_seconds += seconds

    def as_dict(self) -> dict[str, float]:
        per_step = self.seconds / self.steps if self.steps else 0.0
        advance = self.advance_seconds / self.advance_steps if self.advance_steps else 0.0
        return {
            "mask_steps": self.steps,
            "mask_rows": self.rows,
            "mask_fill_s": self.seconds,
            "mask_fill_ms_per_step": 1e3 * per_step,
            "advance_s": self.advance_seconds,
            "advance_ms_per_step": 1e3 * advance,
        }


@dataclass
class StepBitmask:
    rows: list[int]  # the constrained rows of the batch
    words: torch.Tensor  # int32 [len(rows), ceil(vocab / 32)], on the host


class BitmaskFiller:
    """Fills a batch's masks with the process's pool of host threads (``library.executor``),
    into host buffers the backend uploads without another copy (``Transfers.host_buffer``)."""

    def __init__(self, transfers: Transfers | None = None) -> None:
        self.stats = MaskStats()
        self._transfers = transfers

    def fill(self, seqs: list[Sequence]) -> StepBitmask | None:
        """The masks of ``seqs``' constrained rows; None when no row is constrained."""
        # A sequence that the step before finished (overlapped steps) samples a token nobody
        # keeps: its grammar may be complete or failed, so its row stays free.
        rows = [i for i, s in enumerate(seqs) if _constrains(s)]
        if not rows:
            return None
        start = time.perf_counter()
        matchers = [seqs[i].grammar.matcher for i in rows]  # type: ignore[union-attr]
        n_vocab = seqs[rows[0]].grammar.vocab_size  # type: ignore[union-attr]
        shape = (len(rows), (n_vocab + 31) // 32)
        words = (
            torch.empty(shape, dtype=torch.int32)
            if self._transfers is None
            else self._transfers.host_buffer(shape, torch.int32)
        )
        pairs = [(m, k) for k, m in enumerate(matchers)]
        executor().unsafe_compute_mask_ptr(pairs, words.data_ptr(), words.shape[1] * 4, len(rows))
        stats = self.stats
        stats.steps += 1
        stats.rows += len(rows)
        stats.seconds += time.perf_counter() - start
        return StepBitmask(rows, words)


def _constrains(seq: Sequence) -> bool:
    grammar = seq.grammar
    return (
        grammar is not None
        and grammar.active
        and not seq.is_finished
        and not grammar.matcher.is_error()
    )


def apply_bitmask(logits: torch.Tensor, mask: StepBitmask) -> torch.Tensor:
    """A copy of ``logits`` [batch, vocab] with every token a row's mask forbids at -inf.

    Ids past the mask's width (logits wider than the grammar's vocabulary) are forbidden too.
    The words travel as bytes: on a little-endian host and device, bit ``b`` of byte ``k`` is
    token ``8 * k + b``, so one shift, one AND and one ``where`` do the whole batch."""
    device, vocab = logits.device, logits.shape[1]
    words = to_device(mask.words, torch.int32, device)
    num_rows = words.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    bits = (words.view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    allowed = bits.view(num_rows, -1).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    allowed = allowed[:, :vocab]
    if num_rows != logits.shape[0]:  # some rows are free: widen to the whole batch
        rows = to_device(mask.rows, torch.int64, device)
        full = torch.ones(logits.shape, dtype=torch.bool, device=device)
        allowed = full.index_copy_(0, rows, allowed)
    return torch.where(allowed, logits, float("-inf"))
