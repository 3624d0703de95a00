"""Reasoning models write their thinking between markers before the answer,

    <think>
    The user asks for ... so ...
    </think>

    The answer.

and the server returns the thinking as ``reasoning_content``, apart from the answer's
``content``. A ``ReasoningFormat`` names the markers and where the output starts;
``split_reasoning`` splits an output (the whole one, or as far as it has streamed: it is
monotonic, holding back text that may still be a marker).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from hwlm.server.tools.base import held_marker_prefix
from hwlm.server.tools.json_scan import skip_ws


class ReasoningStart(Enum):
    """Where a request's output starts."""

    INSIDE = "inside"  # in the reasoning (the prompt opened it); a start marker is optional
    TAGGED = "tagged"  # reasoning only if the output opens with the start marker
    AFTER = "after"  # after it (the prompt closed it, e.g. Qwen3 with enable_thinking=false)


@dataclass(frozen=True)
class ReasoningFormat:
    """A model family's reasoning markers; ``default_start``: where an output starts when the
    prompt neither opened nor closed the reasoning."""

    name: str
    start: str
    end: str
    default_start: ReasoningStart

    def start_for_prompt(self, prompt: str) -> ReasoningStart:
        """Where the output of ``prompt`` starts: a prompt ending with the end marker has
        closed the reasoning, one ending with the start marker has opened it."""
        tail = prompt.rstrip()
        if tail.endswith(self.end):
            return ReasoningStart.AFTER
        if tail.endswith(self.start):
            return ReasoningStart.INSIDE
        return self.default_start


@dataclass(frozen=True, slots=True)
class Split:
    reasoning: str
    content: str


def split_reasoning(fmt: ReasoningFormat, start: ReasoningStart, text: str, final: bool) -> Split:
    """The reasoning and the content of ``text`` (the output so far; ``final``: all of it).
    Reasoning and content are stripped of surrounding whitespace; what may still become a
    marker (or whitespace that may end the reasoning) is held back until it is known."""
    if start is ReasoningStart.AFTER:
        return Split("", text)
    first = skip_ws(text, 0)
    if not final and fmt.start.startswith(text[first:]):
        return Split("", "")  # nothing yet, or the start marker is still being written
    if text.startswith(fmt.start, first):
        body = first + len(fmt.start)
    elif start is ReasoningStart.INSIDE:
        body = 0
    else:
        return Split("", text)
    end = text.find(fmt.end, body)
    if end < 0:
        reasoning = text[body:]
        if not final:
            reasoning = reasoning[: len(reasoning) - held_marker_prefix(reasoning, fmt.end)]
        return Split(reasoning.strip(), "")
    return Split(text[body:end].strip(), text[end + len(fmt.end) :].lstrip())
