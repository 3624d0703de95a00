"""Text fields checked where they enter the server: every string of a request must be valid
Unicode that UTF-8 can encode.

JSON may carry lone surrogates (``"\\ud800"``), and Python's JSON decoder also turns the raw bytes
of an encoded surrogate (``\\xed\\xa0\\x80``) into one; the tokenizer cannot take such text. A
request holding one anywhere (prompt, messages, stop, bad_words, logit_bias keys, ...) gets a 400
naming the field, before anything else reads it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from hwlm.server.errors import APIError


def check_text_fields(request: BaseModel) -> None:
    """400 naming the first field of ``request`` that holds text UTF-8 cannot encode."""
    for name in type(request).model_fields:
        where = _first_unencodable(getattr(request, name, None), name)
        if where is not None:
            raise APIError(
                f"{where} is not valid Unicode text (it holds a lone surrogate such as "
                "\\ud800, or the bytes of one)",
                param=name,
            )


def _first_unencodable(value: Any, path: str) -> str | None:
    """Where in ``value`` (a parsed JSON value or model) the first bad string is, or None."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            found = _first_unencodable(getattr(value, name, None), f"{path}.{name}")
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if isinstance(item, int | float | bool) or item is None:
                continue
            found = _first_unencodable(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _encodable(key):
                return f"{path} (a key)"
            found = _first_unencodable(item, f"{path}[{key!r:.40}]")
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
