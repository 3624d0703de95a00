"""A step's token bitmask: filled on the host for the rows a grammar constrains, applied to the
logits on their device in one batched masking.

Bit ``j`` of int32 word ``w`` of a row allows token ``32 * w + j`` (llguidance's layout). The
host fills only the constrained rows, in parallel across CPU cores (``LLExecutor``, which
releases the GIL). ``fill`` does it on the calling thread; ``start_fill`` hands it to a thread
of its own and returns a ``MaskJob``, so that the engine's thread can go on with other work
(finishing the step before, scheduling and preparing the next) while the masks are computed.
``MaskStats`` also counts the engine's grammar advances (``advance.advance_grammars``).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


class MaskJob:
    """Masks being filled on the filler's thread; ``result`` waits for them.

    While a job runs, the interpreter's switch interval is short: the filling thread needs the
    GIL for a moment to start and to return, and with the default 5 ms the engine's thread,
    busy in Python, would keep it that long. ``result`` puts the interval back."""

    def __init__(self, future: Future[StepBitmask | None] | None, interval: float | None) -> None:
        self._future = future
        self._interval = interval  # the switch interval to restore; None: nothing to restore

    def result(self) -> StepBitmask | None:
        """The masks (None when no row is constrained); re-raises the fill's exception."""
        try:
            return None if self._future is None else self._future.result()
        finally:
            if self._interval is not None:
                sys.setswitchinterval(self._interval)
                self._interval = None


class BitmaskFiller:
    """Fills a batch's masks with the process's pool of host threads (``library.executor``),
    into host buffers the backend uploads without another copy (``Transfers.host_buffer``)."""

    def __init__(self, transfers: Transfers | None = None) -> None:
        self.stats = MaskStats()
        self._transfers = transfers
        self._thread: ThreadPoolExecutor | None = None  # for ``start_fill``, made on first use

    def fill(self, seqs: list[Sequence]) -> StepBitmask | None:
        """The masks of ``seqs``' constrained rows; None when no row is constrained."""
        work = self._prepare(seqs)
        return None if work is None else self._compute(*work)

    def start_fill(self, seqs: list[Sequence]) -> MaskJob:
        """``fill`` on the filler's own thread. The rows and their buffer are chosen here; until
        ``result`` returns, the caller must not advance, copy or drop these rows' matchers."""
        work = self._prepare(seqs)
        if work is None:
            return MaskJob(None, None)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="hwlm-masks")
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, _JOB_SWITCH_INTERVAL_S))
        return MaskJob(self._thread.submit(self._compute, *work), interval)

    def _prepare(self, seqs: list[Sequence]) -> tuple[list[int], list[Any], torch.Tensor] | None:
        """The constrained rows, their matchers and an empty buffer for their masks."""
        # A sequence that the step before finished (overlapped steps) samples a token nobody
        # keeps: its grammar may be complete or failed, so its row stays free.
        rows = [i for i, s in enumerate(seqs) if _constrains(s)]
        if not rows:
            return None
        matchers = [seqs[i].grammar.matcher for i in rows]  # type: ignore[union-attr]
        n_vocab = seqs[rows[0]].grammar.vocab_size  # type: ignore[union-attr]
        shape = (len(rows), (n_vocab + 31) // 32)
        words = (
            torch.empty(shape, dtype=torch.int32)
            if self._transfers is None
            else self._transfers.host_buffer(shape, torch.int32)
        )
        return rows, matchers, words

    def _compute(self, rows: list[int], matchers: list[Any], words: torch.Tensor) -> StepBitmask:
        start = time.perf_counter()
        pairs = [(m, k) for k, m in enumerate(matchers)]
        executor().unsafe_compute_mask_ptr(pairs, words.data_ptr(), words.shape[1] * 4, len(rows))
        stats = self.stats
        stats.steps += 1
        stats.rows += len(rows)
        stats.seconds += time.perf_counter() - start
        return StepBitmask(rows, words)


# Short enough that the filling thread starts and returns within a fraction of a step.
_JOB_SWITCH_INTERVAL_S = 0.0002


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
    Ids past the mask's width (logits wider than the grammar's vocabulary) are forbidden too."""
    batch, vocab = logits.shape
    allowed = allowed_tokens(batch_words(mask, batch, vocab, logits.device), vocab)
    return torch.where(allowed, logits, float("-inf"))


def batch_words(mask: StepBitmask, batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """``mask``'s words on ``device`` for every row of a batch of ``vocab`` logits: int32
    [batch, ceil(vocab / 32)], all bits set in the rows no grammar constrains, none past the
    mask's width in those it does."""
    words = to_device(mask.words, torch.int32, device)
    width = (vocab + 31) // 32
    if words.shape == (batch, width):
        return words
    constrained = torch.zeros((words.shape[0], width), dtype=torch.int32, device=device)
    constrained[:, : min(width, words.shape[1])] = words[:, :width]
    rows = to_device(mask.rows, torch.int64, device)
    full = torch.full((batch, width), -1, dtype=torch.int32, device=device)
    return full.index_copy_(0, rows, constrained)


def allowed_tokens(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool [rows, vocab]: whether ``words`` (int32 [rows, n]) allow each token; ids past the
    words are not allowed. The words are read as bytes: on a little-endian host and device,
    bit ``b`` of byte ``k`` is token ``8 * k + b``, so one shift, one AND do the whole batch."""
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = (words.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    allowed = bits.view(words.shape[0], -1).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return allowed[:, :vocab]
