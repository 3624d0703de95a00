"""Over-long prompts refused from a cheap bound, before any tokenization.

No token stands for more bytes of text than the tokenizer's longest piece, so a prompt of ``B``
UTF-8 bytes has at least ``B / longest`` tokens: when ``B`` exceeds ``max_model_len * longest``
the prompt cannot fit, and tokenizing it (seconds for megabytes of text) would only lead to the
same 400. The longest piece is measured once per tokenizer, on its vocabulary's strings, which are
never shorter in UTF-8 than the text they stand for (byte-level pieces such as ``Ġ`` or ``<0x0A>``
are longer): the bound may let a hopeless prompt through to the exact check, never refuse one that
fits. (A tokenizer whose normalizer deletes text, collapsing runs of spaces say, breaks that
premise; none of the supported models' does.)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from hwlm.server.errors import APIError

_LONGEST: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_MIN_PIECE_BYTES = 4  # any tokenizer covers at least one UTF-8 character per token


def longest_piece_bytes(tokenizer: Any) -> int | None:
    """UTF-8 bytes of the tokenizer's longest vocabulary piece (special tokens included); None
    for a tokenizer that cannot list its vocabulary (no bound then)."""
    try:
        return _LONGEST[tokenizer]
    except (KeyError, TypeError):
        pass
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = get_vocab()
    longest = max((len(p.encode("utf-8", "surrogatepass")) for p in vocab), default=0)
    longest = max(longest, _MIN_PIECE_BYTES)
    try:
        _LONGEST[tokenizer] = longest
    except TypeError:  # not weakly referenceable: measured again next time
        pass
    return longest


def check_text_length(
    texts: Iterable[str], max_model_len: int, longest_piece: int | None, param: str
) -> None:
    """400 naming ``param`` when the texts together hold more UTF-8 bytes than any prompt of
    ``max_model_len`` tokens can (nothing is checked when ``longest_piece`` is None)."""
    if longest_piece is None:
        return
    limit = max_model_len * longest_piece
    size = 0
    for text in texts:
        size += len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise APIError(
                f"{param} is too long: over {limit} bytes of text, more than this model's "
                f"maximum context length of {max_model_len} tokens can hold (no token stands "
                f"for more than {longest_piece} bytes). Please reduce the length of the input.",
                param=param,
            )


def prompt_texts(request: Any) -> list[list[str]]:
    """The texts of each prompt a completion or chat request makes (chat: one prompt, its
    messages' text; token-id prompts: none)."""
    messages = getattr(request, "messages", None)
    if messages is not None:
        return [[t for m in messages for t in _content_texts(m.content)]]
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, str):
        return [[prompt]]
    if isinstance(prompt, list):
        return [[p] for p in prompt if isinstance(p, str)]
    return []


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p.text for p in content if isinstance(getattr(p, "text", None), str)]
    return []
