"""Llama 3.1 / 3.2 JSON tool calls: the whole answer is one call's JSON (or several separated by
``;``), optionally after the ``<|python_tag|>`` token,

    {"name": "get_weather", "parameters": {"city": "Paris"}}

An answer that does not start with an object, or whose first object is not a call, is content.
"""

from __future__ import annotations

from hwlm.server.tools.base import Parsed, PartialCall, join_content, read_envelope
from hwlm.server.tools.json_scan import InvalidJSON, skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonFormat:
    name = "llama3_json"
    needs_special_tokens = False  # the tag is optional; a stripped one changes nothing

    def parse(self, text: str, final: bool) -> Parsed:
        start = skip_ws(text, 0)
        if not final and PYTHON_TAG.startswith(text[start:]):
            return Parsed("")  # nothing yet, or the tag is still being written
        if text.startswith(PYTHON_TAG, start):
            start = skip_ws(text, start + len(PYTHON_TAG))
            if start >= len(text) and not final:
                return Parsed("")
        if start >= len(text) or text[start] != "{":
            return Parsed(join_content([text], final))
        calls: list[PartialCall] = []
        pos = start
        while True:
            try:
                call, end = read_envelope(text, pos, final)
            except InvalidJSON:
                call, end = None, None
            if call is None:  # not a call: the rest is content
                if not calls:
                    return Parsed(join_content([text], final))
                return Parsed(join_content(["", text[pos:]], final), calls)
            calls.append(call)
            if end is None:
                return Parsed("", calls)
            after = skip_ws(text, end)
            if after < len(text) and text[after] == ";":
                after = skip_ws(text, after + 1)
                if after >= len(text) and not final:
                    return Parsed("", calls)
                if after < len(text) and text[after] == "{":
                    pos = after
                    continue
            return Parsed(join_content(["", text[after:]], final), calls)
