"""Repetition, frequency and presence penalties for a batch, in batched torch ops (vLLM's rules).

- repetition_penalty r (> 0): for every token seen in the prompt or the output so far, a positive
  logit is divided by r and a negative one multiplied by r (r > 1 discourages repeats).
- frequency_penalty f: ``logit -= f * count``, count = occurrences in the output so far.
- presence_penalty p: ``logit -= p`` once for every token present in the output so far.

Applied in that order, sparsely: only the logits of tokens that occur are gathered and written
back (``gather``/``scatter`` over padded ``[batch, length]`` token-id tensors), so the cost grows
with the tokens seen, not with batch x vocabulary. The logits get one extra column that absorbs
the padding id (``vocab``) and is dropped after.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hwlm.engine.sequence import Sequence
from hwlm.engine.transfer import to_device


@dataclass
class PenaltyTensors:
    output_ids: torch.Tensor  # int64 [batch, max_output_len], padded with vocab_size
    prompt_ids: torch.Tensor | None  # int64 [batch, max_prompt_len]; None: no repetition penalty
    repetition: torch.Tensor  # float [batch]
    frequency: torch.Tensor  # float [batch]
    presence: torch.Tensor  # float [batch]

    @classmethod
    def build(
        cls, seqs: list[Sequence], vocab_size: int, device: torch.device
    ) -> PenaltyTensors | None:
        """The penalty inputs of this batch, or None when no sequence uses a penalty."""
        params = [s.params for s in seqs]
        if not any(p.has_penalties for p in params):
            return None
        active = [p.has_penalties for p in params]
        outputs = [
            np.asarray(s.output_token_ids, np.int64) if on else _EMPTY
            for s, on in zip(seqs, active, strict=True)
        ]
        prompt_ids = None
        if any(p.repetition_penalty != 1.0 for p in params):
            prompts = [
                s.prompt_token_set if p.repetition_penalty != 1.0 else _EMPTY
                for s, p in zip(seqs, params, strict=True)
            ]
            prompt_ids = _padded(prompts, vocab_size, device)

        def column(name: str) -> torch.Tensor:
            return to_device([getattr(p, name) for p in params], torch.float32, device)

        return cls(
            output_ids=_padded(outputs, vocab_size, device),
            prompt_ids=prompt_ids,
            repetition=column("repetition_penalty"),
            frequency=column("frequency_penalty"),
            presence=column("presence_penalty"),
        )


_EMPTY = np.zeros(0, np.int64)


def _padded(rows: list[np.ndarray], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return to_device(out, torch.int64, device)


def apply_penalties(logits: torch.Tensor, t: PenaltyTensors) -> torch.Tensor:
    """Penalised copy of ``logits`` [batch, vocab]; rows with neutral values are unchanged."""
    batch, vocab = logits.shape
    ext = torch.cat([logits, logits.new_zeros(batch, 1)], dim=1)
    out_ids = t.output_ids
    if t.prompt_ids is not None:
        seen = torch.cat([t.prompt_ids, out_ids], dim=1)
        values = ext.gather(1, seen)
        scale = t.repetition[:, None].to(logits.dtype)
        # A token seen twice is written twice with the same value: no accumulation.
        ext.scatter_(1, seen, torch.where(values > 0, values / scale, values * scale))
    frequency = -t.frequency[:, None].to(logits.dtype)
    ext.scatter_add_(1, out_ids, frequency.expand(out_ids.shape).contiguous())
    sorted_ids = out_ids.sort(dim=1).values
    first = torch.ones(sorted_ids.shape, dtype=logits.dtype, device=logits.device)
    first[:, 1:] = (sorted_ids[:, 1:] != sorted_ids[:, :-1]).to(logits.dtype)
    ext.scatter_add_(1, sorted_ids, -t.presence[:, None].to(logits.dtype) * first)
    return ext[:, :vocab]
