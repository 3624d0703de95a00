"""A step's grammar advance: every constrained sequence's new tokens consumed by its matcher,
in one pass over the step's sequences.

One ``consume_token`` call per token, on the calling thread, not llguidance's parallel
``consume_token_par``: in steady state a token costs a matcher ~3 us, less than the thread
pool's hand-off, and one call per sequence measured faster on both machines (batch 256: 0.7
against 0.8 ms on 2 cores, 0.87 against 1.81 ms on the H200 host's 16; docs/sampling.md, "Cost
per step")."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hwlm.engine.sequence import Sequence


def advance_grammars(seqs: list[Sequence]) -> tuple[dict[int, ValueError], float]:
    """Feed each of ``seqs`` (all with a grammar) the output tokens its grammar has not seen
    (usually one; more after ``after_token_ids`` activates, or when a caller lets tokens
    accumulate).

    Returns the rejections, by position in ``seqs`` (a matcher that refuses a token stops
    there: its state is an error, the caller fails that request alone), and the seconds spent.
    """
    start = time.perf_counter()
    errors: dict[int, ValueError] = {}
    for k, seq in enumerate(seqs):
        error = seq.grammar.advance(seq.token_ids, seq.num_prompt_tokens)  # type: ignore[union-attr]
        if error is not None:
            errors[k] = error
    return errors, time.perf_counter() - start
