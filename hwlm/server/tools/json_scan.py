"""A JSON scanner for text that is still growing: where a value ends, whether it is unfinished
(the text stops inside it), or that it can never be valid JSON.

Tool-call parsers use it on a model's output while it streams: a call's arguments are sent as
the raw text of their JSON value, fragment by fragment, as far as it is known to belong to it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

WHITESPACE = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_ESCAPES = frozenset('"\\/bfnrtu')
_HEX = frozenset("0123456789abcdefABCDEF")
_LITERALS = ("true", "false", "null")


class InvalidJSON(ValueError):
    """The text cannot be the start of a JSON value, however it goes on."""


def skip_ws(text: str, pos: int) -> int:
    """The index of the first non-whitespace character at or after ``pos``."""
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def scan_value(text: str, pos: int) -> int | None:
    """The end (exclusive) of the JSON value starting at ``pos`` (after any whitespace); None
    if ``text`` ends before the value does. Raises InvalidJSON."""
    pos = skip_ws(text, pos)
    if pos >= len(text):
        return None
    char = text[pos]
    if char == "{":
        return _scan_object(text, pos)
    if char == "[":
        return _scan_array(text, pos)
    if char == '"':
        return scan_string(text, pos)
    if char == "-" or char.isdigit():
        return _scan_number(text, pos)
    for literal in _LITERALS:
        piece = text[pos : pos + len(literal)]
        if piece == literal:
            return pos + len(literal)
        if len(piece) < len(literal) and literal.startswith(piece):
            return None
    raise InvalidJSON(f"unexpected {char!r} at {pos}")


def scan_string(text: str, pos: int) -> int | None:
    """The end of the string whose opening quote is at ``pos``; None if unfinished."""
    if text[pos] != '"':
        raise InvalidJSON(f"expected a string at {pos}")
    i = pos + 1
    n = len(text)
    while i < n:
        char = text[i]
        if char == '"':
            return i + 1
        if char == "\\":
            if i + 1 >= n:
                return None
            if text[i + 1] not in _ESCAPES:
                raise InvalidJSON(f"bad escape at {i}")
            if text[i + 1] == "u":
                digits = text[i + 2 : i + 6]
                if not all(d in _HEX for d in digits):
                    raise InvalidJSON(f"bad unicode escape at {i}")
                if len(digits) < 4:
                    return None
                i += 6
                continue
            i += 2
            continue
        if char < " ":
            raise InvalidJSON(f"control character in a string at {i}")
        i += 1
    return None


def _scan_number(text: str, pos: int) -> int | None:
    end = pos
    while end < len(text) and text[end] in _NUMBER_CHARS:
        end += 1
    if end == len(text):
        return None  # more digits may follow
    if _NUMBER.fullmatch(text, pos, end) is None:
        raise InvalidJSON(f"bad number at {pos}")
    return end


def _scan_array(text: str, pos: int) -> int | None:
    i = skip_ws(text, pos + 1)
    if i >= len(text):
        return None
    if text[i] == "]":
        return i + 1
    while True:
        end = scan_value(text, i)
        if end is None:
            return None
        i = skip_ws(text, end)
        if i >= len(text):
            return None
        if text[i] == "]":
            return i + 1
        if text[i] != ",":
            raise InvalidJSON(f"expected ',' or ']' at {i}")
        i += 1


def _scan_object(text: str, pos: int) -> int | None:
    members, end = read_object(text, pos)
    return end


@dataclass(frozen=True, slots=True)
class Member:
    """An object member: its key and the span of its value in the text (``end`` None while
    the value is unfinished; ``start`` is past any whitespace)."""

    key: str
    start: int
    end: int | None


def read_object(text: str, pos: int) -> tuple[list[Member], int | None]:
    """The members of the object whose ``{`` is at ``pos``, as far as the text goes (the last
    one possibly unfinished; a member whose key is unfinished is left out), and the object's
    end (None if unfinished). Raises InvalidJSON."""
    if text[pos] != "{":
        raise InvalidJSON(f"expected an object at {pos}")
    members: list[Member] = []
    i = skip_ws(text, pos + 1)
    if i < len(text) and text[i] == "}":
        return members, i + 1
    while True:
        if i >= len(text):
            return members, None
        key_end = scan_string(text, i)
        if key_end is None:
            return members, None
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text):
            return members, None
        if text[i] != ":":
            raise InvalidJSON(f"expected ':' at {i}")
        start = skip_ws(text, i + 1)
        end = scan_value(text, start)
        if start < len(text) or end is not None:
            members.append(Member(key, start, end))
        if end is None:
            return members, None
        i = skip_ws(text, end)
        if i >= len(text):
            return members, None
        if text[i] == "}":
            return members, i + 1
        if text[i] != ",":
            raise InvalidJSON(f"expected ',' or '}}' at {i}")
        i = skip_ws(text, i + 1)
