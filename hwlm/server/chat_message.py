"""A chat choice's output as an assistant message: with ``--reasoning-parser`` the reasoning
goes to ``reasoning_content``, and with tools the calls the output holds go to ``tool_calls``
(``content`` is then the text around them, null when there is none, and a choice that stopped
after calling tools finishes with ``tool_calls``). Streamed, each chunk's delta carries what is
new of each (``MessageStream``); the deltas add up to the whole message (``whole_message``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hwlm.server.reasoning import ReasoningFormat, ReasoningStart, split_reasoning
from hwlm.server.tools import ToolCallStreamer, ToolFormat, extract_tool_calls


@dataclass(frozen=True)
class MessageFormat:
    """How one request's outputs become messages. ``reasoning``: the reasoning markers (None:
    no reasoning parser), ``reasoning_start``: where its outputs start; ``tool_format``: reads
    calls (None: the output is all content); ``max_calls``: calls kept (None: all)."""

    reasoning: ReasoningFormat | None = None
    reasoning_start: ReasoningStart = ReasoningStart.AFTER
    include_reasoning: bool = True
    tool_format: ToolFormat | None = None
    max_calls: int | None = None

    @property
    def plain(self) -> bool:
        """The output is the content as it is."""
        return self.reasoning is None and self.tool_format is None

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, the rest) of an output so far."""
        if self.reasoning is None:
            return "", text
        split = split_reasoning(self.reasoning, self.reasoning_start, text, final)
        return split.reasoning, split.content


def finish_reason_with_calls(finish_reason: str | None, num_calls: int) -> str | None:
    """``tool_calls`` for a choice that stopped after calling tools (OpenAI's reason)."""
    return "tool_calls" if num_calls and finish_reason == "stop" else finish_reason


def whole_message(
    fmt: MessageFormat, text: str, finish_reason: str | None
) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished output, and its finish reason."""
    reasoning, rest = fmt.split(text, final=True)
    message: dict[str, Any] = {"role": "assistant", "content": rest}
    if fmt.reasoning is not None:
        message["reasoning_content"] = (reasoning or None) if fmt.include_reasoning else None
    if fmt.tool_format is None:
        if fmt.reasoning is not None:
            message["content"] = rest or None
        return message, finish_reason
    extracted = extract_tool_calls(fmt.tool_format, rest)
    calls = extracted.calls[: fmt.max_calls]
    message["content"] = extracted.content
    if calls:
        message["tool_calls"] = [call.to_dict() for call in calls]
    return message, finish_reason_with_calls(finish_reason, len(calls))


class MessageStream:
    """One streamed choice: the delta for each piece of output text."""

    def __init__(self, fmt: MessageFormat) -> None:
        self._format = fmt
        self._text = ""
        self._reasoning_sent = 0
        self._content_sent = 0
        self._tools = ToolCallStreamer(fmt.tool_format, fmt.max_calls) if fmt.tool_format else None

    def update(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The delta for ``text`` (new output; ``finish_reason`` set on the last piece), and
        the finish reason to send."""
        fmt = self._format
        if fmt.plain:
            return ({"content": text} if text else {}), finish_reason
        self._text += text
        final = finish_reason is not None
        reasoning, rest = fmt.split(self._text, final)
        delta: dict[str, Any] = {}
        if len(reasoning) > self._reasoning_sent:
            if fmt.include_reasoning:
                delta["reasoning_content"] = reasoning[self._reasoning_sent :]
            self._reasoning_sent = len(reasoning)
        if self._tools is None:
            content = rest[self._content_sent :]
            self._content_sent = max(self._content_sent, len(rest))
            calls: list[dict[str, Any]] = []
        else:
            content, calls = self._tools.update(rest, final)
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        num_calls = self._tools.num_calls if self._tools is not None else 0
        return delta, finish_reason_with_calls(finish_reason, num_calls)
