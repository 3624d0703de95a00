"""Tool calls out of a model's output, whole (``extract_tool_calls``) or as OpenAI's stream
deltas (``ToolCallStreamer``): a call's first delta carries its ``index``, ``id``, ``type`` and
``function.name`` (with the arguments known so far), later ones argument fragments only.
Both read the output with the format's ``parse``, so the deltas add up to the whole result."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from hwlm.server.tools.base import PartialCall, ToolFormat


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCall:
    """A finished call, in OpenAI's message shape by ``to_dict``."""

    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=tool_call_id)

    def to_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(slots=True)
class ExtractedToolCalls:
    content: str | None  # None when empty
    calls: list[ToolCall]


def extract_tool_calls(tool_format: ToolFormat, text: str) -> ExtractedToolCalls:
    """The content and calls of a whole output."""
    parsed = tool_format.parse(text, final=True)
    calls = [ToolCall(c.name, c.arguments) for c in parsed.calls if c.name is not None]
    return ExtractedToolCalls(parsed.content or None, calls)


@dataclass(slots=True)
class _SentCall:
    id: str
    arguments: int = 0  # characters of the arguments sent


class ToolCallStreamer:
    """What to send of one choice's output as it grows: content deltas and tool-call deltas.
    With ``max_calls`` (``parallel_tool_calls: false``: 1) further calls are not sent."""

    def __init__(self, tool_format: ToolFormat, max_calls: int | None = None) -> None:
        self._format = tool_format
        self._max_calls = max_calls
        self._content_sent = 0
        self._calls: list[_SentCall] = []

    @property
    def num_calls(self) -> int:
        """Calls begun so far."""
        return len(self._calls)

    def update(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """The content delta and tool-call deltas for the output ``text`` so far."""
        parsed = self._format.parse(text, final)
        content = parsed.content[self._content_sent :]
        self._content_sent = max(self._content_sent, len(parsed.content))
        calls = parsed.calls[: self._max_calls]
        deltas = [d for i, call in enumerate(calls) if (d := self._delta(i, call)) is not None]
        return content, deltas

    def _delta(self, index: int, call: PartialCall) -> dict[str, Any] | None:
        if index < len(self._calls):
            sent = self._calls[index]
            fragment = call.arguments[sent.arguments :]
            if not fragment:
                return None
            sent.arguments = len(call.arguments)
            return {"index": index, "function": {"arguments": fragment}}
        if call.name is None or index != len(self._calls):
            return None  # sent once its name is known, in order
        sent = _SentCall(tool_call_id(), len(call.arguments))
        self._calls.append(sent)
        function = {"name": call.name, "arguments": call.arguments}
        return {"index": index, "id": sent.id, "type": "function", "function": function}
