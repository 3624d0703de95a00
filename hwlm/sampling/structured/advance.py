"""A step's grammar advance: every constrained sequence's new tokens consumed by its matcher,
in one pass over the step's sequences.

One ``consume_token`` call per sequence, not llguidance's parallel ``consume_token_par``: in
steady state a token costs a matcher ~3 us, less than the thread pool's hand-off, and one call
per sequence measured faster on both machines (batch 256: 0.7 against 0.8 ms on 2 cores, 0.87
against 1.81 ms on the H200 host's 16; docs/sampling.md, "Cost per step")."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hwlm.engine.sequence import Sequence
    from hwlm.sampling.structured.state import GrammarState


def advance_grammars(seqs: list[Sequence]) -> tuple[dict[int, ValueError], float]:
    """Feed each of ``seqs`` (all with a grammar) the output tokens its grammar has not seen.

    Returns the rejections, by position in ``seqs`` (a matcher that refuses a token stops
    there: its state is an error, the caller fails that request alone), and the seconds spent.
    Usually each sequence has one new token; after ``after_token_ids`` activates, or when a
    caller lets tokens accumulate, the k-th tokens of all sequences go in the k-th call."""
    start = time.perf_counter()
    pending: list[tuple[int, GrammarState, list[int]]] = []
    for k, seq in enumerate(seqs):
        state = seq.grammar
        assert state is not None
        tokens = state.take_new(seq.token_ids, seq.num_prompt_tokens)
        if tokens:
            pending.append((k, state, tokens))
    errors: dict[int, ValueError] = {}
    depth = 0
    while pending:
        batch = [(state.matcher, tokens[depth]) for _, state, tokens in pending]
        accepted = _consume(batch)
        for (k, state, tokens), ok in zip(pending, accepted, strict=True):
            if not ok:
                errors[k] = state.rejected(tokens[depth])
        depth += 1
        pending = [p for p in pending if p[0] not in errors and len(p[2]) > depth]
    for seq in seqs:
        seq.grammar.settle()  # type: ignore[union-attr]
    return errors, time.perf_counter() - start


def _consume(batch: list[tuple[object, int]]) -> list[bool]:
    return [bool(matcher.consume_token(token)) for matcher, token in batch]  # type: ignore[attr-defined]
