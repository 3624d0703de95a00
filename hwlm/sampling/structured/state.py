"""One sequence's place in its grammar, driven by the sequence's output tokens.

The state remembers how many output tokens it has seen, so feeding it the output again (after a
preemption recomputed the sequence, say) never consumes a token twice. With ``after_token_ids``
it waits, unconstrained, until the output contains that sequence, then constrains what follows.

The engine advances a whole step's states together (``advance.advance_grammars``); ``observe``
does the same for one state.
"""

from __future__ import annotations

import copy
from typing import Any


class GrammarState:
    def __init__(
        self, matcher: Any, vocab_size: int, after_token_ids: list[int] | None = None
    ) -> None:
        self.matcher = matcher  # an llguidance.LLMatcher, owned by this state
        self.vocab_size = vocab_size  # the ids its masks cover
        self.after_token_ids = after_token_ids
        self.active = after_token_ids is None  # constraining the next token
        self.num_seen = 0  # output tokens observed so far
        # Read from the matcher when it consumes (``advance``), not later: once a step's tokens
        # are in, the matcher may be busy filling the next mask on another thread.
        self.is_finished = False  # complete, allows nothing more (but EOS): the sequence stops

    def observe(self, token_ids: list[int], num_prompt_tokens: int) -> None:
        """``advance``, raising its ValueError."""
        error = self.advance(token_ids, num_prompt_tokens)
        if error is not None:
            raise error

    def advance(self, token_ids: list[int], num_prompt_tokens: int) -> ValueError | None:
        """Consume the output tokens (``token_ids`` after the prompt) not seen yet, and note
        whether the grammar is then complete. Returns the one-line error if the grammar refused
        one (the matcher stops there, in its error state): only conflicting controls (an
        ``allowed_token_ids`` set outside the grammar, say) can sample such a token."""
        matcher = self.matcher
        for token in self.take_new(token_ids, num_prompt_tokens):
            if not matcher.consume_token(token):
                self.is_finished = False
                return self.rejected(token)
        self.is_finished = self.active and bool(matcher.is_stopped())
        return None

    def take_new(self, token_ids: list[int], num_prompt_tokens: int) -> list[int]:
        """Mark the output tokens not seen yet as seen; return those the grammar must consume
        (in order): all of them once active, else those after ``after_token_ids`` completes."""
        first = num_prompt_tokens + self.num_seen
        if self.active and first == len(token_ids) - 1:  # the usual step: one new token
            self.num_seen += 1
            return [token_ids[first]]
        to_consume: list[int] = []
        for i in range(first, len(token_ids)):
            if self.active:
                to_consume.append(token_ids[i])
            else:
                self.active = self._triggered(token_ids, i, num_prompt_tokens)
        self.num_seen = len(token_ids) - num_prompt_tokens
        return to_consume

    def rejected(self, token: int) -> ValueError:
        """The one-line error for ``token``, which the matcher refused."""
        error = " ".join(str(self.matcher.get_error()).split())
        return ValueError(f"token {token} is not allowed by the grammar: {error}")

    def _triggered(self, token_ids: list[int], i: int, num_prompt_tokens: int) -> bool:
        """Whether the output up to position ``i`` ends with ``after_token_ids``."""
        after = self.after_token_ids
        assert after is not None
        start = i + 1 - len(after)
        return start >= num_prompt_tokens and token_ids[start : i + 1] == after

    def copy(self) -> GrammarState:
        """An independent state at the same place (for a forked sample)."""
        twin = copy.copy(self)
        twin.matcher = self.matcher.deep_copy()
        return twin
