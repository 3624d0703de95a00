"""Tokenizer loading (transformers' AutoTokenizer) and detokenization."""

from __future__ import annotations

import copy
import logging
from typing import Any

logger = logging.getLogger(__name__)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """An AutoTokenizer from a local folder or hub id; a ValueError naming the path on failure."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


def decode_tokens(
    tokenizer: Any,
    token_ids: list[int],
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool = True,
) -> str:
    if spaces_between_special_tokens:
        text: str = tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text
    text = tokenizer.decode(
        token_ids, skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=False
    )
    return text


class IncrementalDetokenizer:
    """Text of a growing token list, emitted piece by piece without re-decoding everything.

    Decodes a short window (from ``prefix_offset``) so that byte-level tokens that only form a
    character together are emitted once complete (a trailing U+FFFD means: wait)."""

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.spaces = spaces_between_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.token_ids.append(token_id)
        window = self.token_ids[self.prefix_offset : self.read_offset]
        prefix = decode_tokens(self.tokenizer, window, self.skip, self.spaces)
        full = decode_tokens(
            self.tokenizer, self.token_ids[self.prefix_offset :], self.skip, self.spaces
        )
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def copy(self) -> IncrementalDetokenizer:
        """An independent twin sharing the tokenizer (for a forked sequence)."""
        twin = copy.copy(self)
        twin.token_ids = list(self.token_ids)
        return twin
