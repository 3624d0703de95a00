"""Per-request token controls, applied to a batch of logits in vLLM's order.

1. ``allowed_token_ids``: every other token is masked (-inf).
2. ``bad_words``: a one-token word is always masked; for a longer word, its last token is masked
   whenever the output so far ends with the word's other tokens.
3. ``min_tokens``: EOS (even with ``ignore_eos``) and ``stop_token_ids`` are masked while the
   output is shorter.
4. ``logit_bias``: added to the given tokens' logits.

Index lists are gathered from the sequences once per step (only sequences that use a control
contribute); each step is then one indexed write on the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hwlm.engine.sequence import Sequence
from hwlm.engine.transfer import to_device

_Index = tuple[list[int], list[int]]  # (rows, token ids)


@dataclass
class TokenConstraints:
    allowed: _Index | None
    banned: _Index | None  # bad words, then stops before min_tokens
    bias: tuple[list[int], list[int], list[float]] | None

    @classmethod
    def build(cls, seqs: list[Sequence]) -> TokenConstraints | None:
        allowed = _allowed(seqs)
        banned = _bad_words(seqs)
        _extend(banned, _stops_before_min_tokens(seqs))
        bias = _bias(seqs)
        if allowed is None and not banned[0] and bias is None:
            return None
        return cls(allowed, banned if banned[0] else None, bias)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A constrained copy of ``logits`` [batch, vocab]."""
        device = logits.device
        if self.allowed is not None:
            rows, cols = _tensors(self.allowed, device)
            constrained = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
            constrained[rows] = True
            keep = (~constrained)[:, None].expand_as(logits).clone()
            keep[rows, cols] = True
            logits = logits.masked_fill(~keep, float("-inf"))
        else:
            logits = logits.clone()
        if self.banned is not None:
            rows, cols = _tensors(self.banned, device)
            logits[rows, cols] = float("-inf")
        if self.bias is not None:
            rows, cols = _tensors((self.bias[0], self.bias[1]), device)
            values = to_device(self.bias[2], logits.dtype, device)
            logits.index_put_((rows, cols), values, accumulate=True)
        return logits


def _tensors(index: _Index, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = index
    return (
        to_device(rows, torch.int64, device),
        to_device(cols, torch.int64, device),
    )


def _extend(index: _Index, more: _Index) -> None:
    index[0].extend(more[0])
    index[1].extend(more[1])


def _allowed(seqs: list[Sequence]) -> _Index | None:
    rows: list[int] = []
    cols: list[int] = []
    for i, seq in enumerate(seqs):
        allowed = seq.params.allowed_token_ids
        if allowed is not None:
            rows.extend([i] * len(allowed))
            cols.extend(allowed)
    return (rows, cols) if rows else None


def _bad_words(seqs: list[Sequence]) -> _Index:
    rows: list[int] = []
    cols: list[int] = []
    for i, seq in enumerate(seqs):
        if not seq.bad_words_token_ids:
            continue
        num_out = seq.num_output_tokens
        for word in seq.bad_words_token_ids:
            prefix_len = len(word) - 1
            if prefix_len > num_out:
                continue
            if prefix_len == 0 or seq.token_ids[-prefix_len:] == word[:-1]:
                rows.append(i)
                cols.append(word[-1])
    return rows, cols


def _stops_before_min_tokens(seqs: list[Sequence]) -> _Index:
    rows: list[int] = []
    cols: list[int] = []
    for i, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            stops = [*seq.eos_token_ids, *(seq.params.stop_token_ids or ())]
            rows.extend([i] * len(stops))
            cols.extend(stops)
    return rows, cols


def _bias(seqs: list[Sequence]) -> tuple[list[int], list[int], list[float]] | None:
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for i, seq in enumerate(seqs):
        for token_id, value in (seq.params.logit_bias or {}).items():
            rows.append(i)
            cols.append(token_id)
            values.append(value)
    return (rows, cols, values) if rows else None
