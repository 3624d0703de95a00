"""What every tool-call format shares: calls read from a model's output as far as it goes
(``Parsed``), the call envelope ``{"name": ..., "arguments": {...}}``, and how the text around
calls becomes the message's content.

A format's ``parse(text, final)`` reads the whole output so far. It must be monotonic: as the
text grows, the content it gives only grows (text that may still turn into a call marker is
held back until it is known not to), and so do each call's name and arguments. Streaming
(``hwlm.server.tools.streaming``) then sends what is new, and the non-streamed result is
``parse(text, final=True)``: the two agree by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from hwlm.server.tools.json_scan import InvalidJSON, Member, read_object, skip_ws

ARGUMENT_KEYS = ("arguments", "parameters")  # OpenAI/Hermes/Mistral, Llama 3.1


@dataclass(slots=True)
class PartialCall:
    """A call as far as the output goes: its ``name`` once complete, the raw JSON text of its
    ``arguments`` so far (an object's text; ``{}`` when a complete call has none)."""

    name: str | None
    arguments: str
    complete: bool


@dataclass(slots=True)
class Parsed:
    """A model's output split into content (text outside calls, held back where it may still
    become a call) and calls."""

    content: str
    calls: list[PartialCall] = field(default_factory=list)


class ToolFormat(Protocol):
    """A model family's way of writing tool calls in its output."""

    name: str
    # Special tokens the format's markers are (kept in the output text: skip_special_tokens off).
    needs_special_tokens: bool

    def parse(self, text: str, final: bool) -> Parsed:
        """Content and calls of ``text`` (the output so far; ``final``: the whole output)."""


def envelope(text: str, members: list[Member], complete: bool) -> PartialCall | None:
    """The call an envelope object's members describe: ``name`` (a string) and its arguments
    (an object, or a string holding one's JSON). None if a complete envelope is not a call."""
    by_key = {m.key: m for m in members}
    name_member = by_key.get("name")
    name = None
    if name_member is not None and name_member.end is not None:
        value = json.loads(text[name_member.start : name_member.end])
        if not isinstance(value, str) or not value:
            return None
        name = value
    args_member = next((by_key[k] for k in ARGUMENT_KEYS if k in by_key), None)
    arguments = "" if args_member is None else _arguments(text, args_member)
    if arguments is None:
        return None
    if not complete:
        return PartialCall(name, arguments, False)
    if name is None:
        return None
    return PartialCall(name, arguments or "{}", True)


def _arguments(text: str, member: Member) -> str | None:
    """The arguments' raw text so far; None if they cannot be an object's JSON."""
    if member.end is None:  # unfinished: every character so far is part of it
        raw = text[member.start :]
        return raw if not raw or raw[0] == "{" else ("" if raw[0] == '"' else None)
    raw = text[member.start : member.end]
    value = json.loads(raw)
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            inner = json.loads(value)
        except ValueError:
            return None
        return value if isinstance(inner, dict) else None
    return raw if isinstance(value, dict) else None


def read_envelope(text: str, pos: int, final: bool) -> tuple[PartialCall | None, int | None]:
    """The call whose envelope object starts at ``pos``, and the envelope's end (None while
    unfinished). None for the call when it is none; raises InvalidJSON for text that is no
    JSON object. When ``final``, an unfinished envelope with a name is a complete call with
    the arguments as far as they go: the output was cut short, and a stream has sent it."""
    members, end = read_object(text, pos)
    if end is None:
        call = envelope(text, members, False)
        if final and call is not None:  # cut short (max_tokens): kept as far as it goes
            call = PartialCall(call.name, call.arguments, True) if call.name else None
        return call, None
    return envelope(text, members, True), end


def held_marker_prefix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` might begin ``marker`` (held back)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def join_content(segments: list[str], final: bool) -> str:
    """The content from the text segments between calls: whitespace next to a call is dropped
    (trailing whitespace of the last segment is held back until the output is ``final``), and
    segments are joined by a newline."""
    pieces = []
    last = len(segments) - 1
    for k, segment in enumerate(segments):
        if k > 0:
            segment = segment.lstrip()
        if k < last or not final:
            segment = segment.rstrip()
        if segment:
            pieces.append(segment)
    return "\n".join(pieces)


def starts_object(text: str, pos: int) -> bool | None:
    """Whether the first non-whitespace character at ``pos`` opens an object; None if there
    is none yet."""
    i = skip_ws(text, pos)
    return None if i >= len(text) else text[i] == "{"


def read_call_array(text: str, pos: int, final: bool) -> tuple[list[PartialCall], int | None]:
    """The calls of a JSON array of envelopes whose ``[`` is at ``pos``, and the array's end
    (None while unfinished). Raises InvalidJSON if it is not such an array."""
    calls: list[PartialCall] = []
    i = skip_ws(text, pos + 1)
    if i < len(text) and text[i] == "]":
        return calls, i + 1
    while True:
        if i >= len(text):
            return calls, None
        if text[i] != "{":
            raise InvalidJSON(f"expected a call object at {i}")
        call, end = read_envelope(text, i, final)
        if call is None:
            raise InvalidJSON(f"the object at {i} is not a call")
        calls.append(call)
        if end is None:
            return calls, None
        i = skip_ws(text, end)
        if i < len(text) and text[i] == "]":
            return calls, i + 1
        if i < len(text) and text[i] != ",":
            raise InvalidJSON(f"expected ',' or ']' at {i}")
        i = skip_ws(text, i + 1) if i < len(text) else i
