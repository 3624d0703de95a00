"""Tokenizing and detokenizing for the routes, in the API process, with either engine seam: a
long text never stalls generation, and a big one runs on a worker thread so that the event
loop keeps serving (the fast tokenizer releases the GIL while it works, and nothing here changes
its settings)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

OFF_LOOP_SIZE = 8192  # texts (and token lists) longer than this are (de)tokenized on a thread


async def maybe_off_loop(size: int, fn: Callable[[], T]) -> T:
    """``fn()``, on a worker thread when the input is big (so the event loop keeps serving)."""
    if size > OFF_LOOP_SIZE:
        return await asyncio.to_thread(fn)
    return fn()


class SeamText:
    """The text half of a seam: needs a ``tokenizer`` property."""

    @property
    def tokenizer(self) -> Any:
        raise NotImplementedError

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self.tokenizer
        return await maybe_off_loop(
            len(text), lambda: list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
        )

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``, special tokens included."""
        tok = self.tokenizer
        return await maybe_off_loop(
            len(token_ids), lambda: str(tok.decode(token_ids, skip_special_tokens=False))
        )

    async def token_strings(self, token_ids: list[int]) -> list[str]:
        tok = self.tokenizer
        return await maybe_off_loop(
            len(token_ids), lambda: list(tok.convert_ids_to_tokens(token_ids))
        )
