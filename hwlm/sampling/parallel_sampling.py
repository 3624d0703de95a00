"""Parallel sampling (``n``, ``best_of``): one request, several samples over one prompt.

A request starts as one sequence. In the step that computes its last prompt token it forks into
``best_of`` samples that share its KV blocks through reference counts (``BlockManager.fork``);
each copies a shared block only when it first writes into it (copy-on-write). The forks wait in
``parent.pending_forks`` so the sampler draws their first tokens from the parent's logits row.
"""

from __future__ import annotations

from collections.abc import Callable

from hwlm.engine.block_manager import BlockManager
from hwlm.engine.sequence import Sequence


def fork_ready_samples(
    seqs: list[Sequence],
    num_new_tokens: list[int],
    block_manager: BlockManager,
    new_seq_id: Callable[[], int],
) -> list[Sequence]:
    """Fork every sequence of the batch whose prompt completes in this step; return those
    parents (their forks are in ``pending_forks``, to be admitted by the caller)."""
    parents = []
    for seq, n in zip(seqs, num_new_tokens, strict=True):
        if seq.num_forks_left and seq.num_computed_tokens + n == seq.num_tokens:
            for index in range(1, seq.num_forks_left + 1):
                child = seq.fork(new_seq_id(), index)
                block_manager.fork(seq, child)
                seq.pending_forks.append(child)
            seq.num_forks_left = 0
            parents.append(seq)
    return parents


def catch_up_forks(parents: list[Sequence]) -> None:
    """After the step's compute: the forks have the parent's computed tokens and block hashes."""
    for parent in parents:
        for child in parent.pending_forks:
            child.num_computed_tokens = parent.num_computed_tokens
            child.block_hashes = list(parent.block_hashes)


def reported_samples(seqs: list[Sequence], finished: bool) -> list[Sequence]:
    """The samples a RequestOutput shows: with best_of > n, once finished, the n with the highest
    cumulative logprob (best first); otherwise all, in sample order."""
    params = seqs[0].params
    assert params.best_of is not None
    if finished and params.best_of > params.n:
        return sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: params.n]
    return sorted(seqs, key=lambda s: s.sample_index)
