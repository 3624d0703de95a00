"""Hermes / Qwen2.5 / Qwen3 tool calls: each call is a JSON envelope between tags,

    I'll check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with any text before (the content). A block that is not a call's JSON stays in the content
as written; a last block missing its closing tag still counts (models stop at EOS there).
"""

from __future__ import annotations

from hwlm.server.tools.base import Parsed, held_marker_prefix, join_content, read_envelope
from hwlm.server.tools.json_scan import InvalidJSON, skip_ws

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


class HermesFormat:
    name = "hermes"
    needs_special_tokens = True  # <tool_call> is a special token in Qwen's tokenizers

    def parse(self, text: str, final: bool) -> Parsed:
        segments = [""]
        parsed = Parsed("")
        pos = 0
        while True:
            start = text.find(OPEN, pos)
            if start < 0:
                tail = text[pos:]
                if not final:
                    tail = tail[: len(tail) - held_marker_prefix(tail, OPEN)]
                segments[-1] += tail
                break
            segments[-1] += text[pos:start]
            body = start + len(OPEN)
            try:
                if skip_ws(text, body) >= len(text):  # nothing after the tag yet
                    if final:
                        segments[-1] += text[start:]
                    break
                call, end = read_envelope(text, skip_ws(text, body), final)
            except InvalidJSON:
                call, end = None, None
            if call is None:  # not a call: the block is content
                close = text.find(CLOSE, body)
                stop = len(text) if close < 0 else close + len(CLOSE)
                segments[-1] += text[start:stop]
                pos = stop
                if close < 0:
                    break
                continue
            parsed.calls.append(call)
            segments.append("")
            if end is None:  # the call is still being written
                break
            after = skip_ws(text, end)
            if text.startswith(CLOSE, after):
                pos = after + len(CLOSE)
            elif not final and CLOSE.startswith(text[after:]):
                break  # the closing tag is still being written
            else:
                pos = end  # no closing tag: what follows is content
        parsed.content = join_content(segments, final)
        return parsed
