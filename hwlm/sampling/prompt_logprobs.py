"""Prompt logprobs: for every prompt token after the first, its log-probability given the tokens
before it, its rank, and the top-N alternatives (``SamplingParams.prompt_logprobs`` = N).

The model's hidden state at position p predicts the token at p + 1, so each computed prompt chunk
yields the entries of the tokens it predicts. Entries are appended to ``Sequence.prompt_logprobs``
(which starts as ``[None]`` for the first token); a sequence that still wants them never reads
the prefix cache (``BlockManager.find_cached_prefix``), so its whole prompt is computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hwlm.engine.scheduler import ScheduledBatch
from hwlm.engine.sequence import Sequence
from hwlm.outputs import Logprob


def record_prompt_logprobs(
    batch: ScheduledBatch,
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Append the prompt logprobs this step's chunks produce (call before the sequences'
    ``num_computed_tokens`` advance)."""
    row = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        if seq.wants_prompt_logprobs:
            _record(seq, hidden[row : row + n], compute_logits)
        row += n


def _record(
    seq: Sequence,
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    assert seq.prompt_logprobs is not None
    first = seq.num_computed_tokens  # position of the chunk's first token
    lo = max(first + 1, len(seq.prompt_logprobs))  # first target position still missing
    hi = min(first + hidden.shape[0] + 1, seq.num_prompt_tokens)  # one past the last target
    if lo >= hi or lo != len(seq.prompt_logprobs):
        return
    logprobs = torch.log_softmax(
        compute_logits(hidden[lo - 1 - first : hi - 1 - first]).float(), -1
    )
    targets = torch.tensor(seq.token_ids[lo:hi], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    wanted = seq.params.prompt_logprobs
    assert wanted is not None
    k = logprobs.shape[1] if wanted == -1 else min(wanted, logprobs.shape[1])
    top_vals, top_ids = logprobs.topk(k, dim=-1)
    for j, target in enumerate(seq.token_ids[lo:hi]):
        entry = {
            t: Logprob(v, r + 1)
            for r, (t, v) in enumerate(zip(top_ids[j].tolist(), top_vals[j].tolist(), strict=True))
        }
        entry.setdefault(target, Logprob(float(chosen[j]), int(ranks[j])))
        seq.prompt_logprobs.append(entry)
