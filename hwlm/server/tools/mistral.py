"""Mistral tool calls: the ``[TOOL_CALLS]`` token, then a JSON array of envelopes,

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

or, with the v11+ tokenizers, ``[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}`` once per call.
Text before the first marker is content; a malformed list is content as written.
"""

from __future__ import annotations

import re

from hwlm.server.tools.base import (
    Parsed,
    PartialCall,
    held_marker_prefix,
    join_content,
    read_call_array,
)
from hwlm.server.tools.json_scan import InvalidJSON, scan_value, skip_ws

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


class MistralFormat:
    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS] is a special token

    def parse(self, text: str, final: bool) -> Parsed:
        start = text.find(MARKER)
        if start < 0:
            held = 0 if final else held_marker_prefix(text, MARKER)
            return Parsed(join_content([text[: len(text) - held]], final))
        head = text[:start]
        pos = skip_ws(text, start + len(MARKER))
        if pos >= len(text):
            return Parsed(join_content([head] if final else [head, ""], final))
        try:
            if text[pos] == "[":
                calls, end = read_call_array(text, pos, final)
            else:
                calls, end = _named_calls(text, start, final)
        except InvalidJSON:
            return Parsed(join_content([text], final))
        tail = "" if end is None else text[end:]
        return Parsed(join_content([head, tail], final), calls)


def _named_calls(text: str, pos: int, final: bool) -> tuple[list[PartialCall], int | None]:
    """Calls written ``[TOOL_CALLS]name[ARGS]{...}``, one after another from ``pos``."""
    calls: list[PartialCall] = []
    while text.startswith(MARKER, pos):
        name_start = pos + len(MARKER)
        name_end = _NAME.match(text, name_start)
        assert name_end is not None  # the pattern matches the empty string
        args = name_end.end()
        name = text[name_start:args]
        if not text.startswith(ARGS, args):
            if not final and ARGS.startswith(text[args:]):
                calls.append(PartialCall(None, "", False))
                return calls, None
            raise InvalidJSON(f"expected {ARGS} after the name at {args}")
        if not name:
            raise InvalidJSON(f"a call without a name at {name_start}")
        body = skip_ws(text, args + len(ARGS))
        end = scan_value(text, body) if body < len(text) else None
        if end is None:  # unfinished (when final: cut short, kept as far as it goes)
            raw = text[body:]
            if raw and raw[0] != "{":
                raise InvalidJSON(f"the arguments at {body} are not an object")
            calls.append(PartialCall(name, raw, final))
            return calls, None
        if text[body] != "{":
            raise InvalidJSON(f"the arguments at {body} are not an object")
        calls.append(PartialCall(name, text[body:end], True))
        pos = skip_ws(text, end)
    if not final and held_marker_prefix(text[pos:], MARKER) == len(text) - pos > 0:
        return calls, None
    return calls, pos
