"""Reasoning formats by the names of vLLM's ``--reasoning-parser``.

- ``qwen3``: ``<think>...</think>`` when the output opens with ``<think>`` (or the prompt
  did); otherwise the whole output is the answer.
- ``deepseek_r1``: the output starts inside the reasoning (DeepSeek-R1's template opens
  ``<think>`` in the prompt; a ``<think>`` the model writes itself is dropped), up to
  ``</think>``; an output that never closes it is all reasoning.
"""

from __future__ import annotations

from hwlm.server.reasoning.base import ReasoningFormat, ReasoningStart

_FORMATS = {
    "qwen3": ReasoningFormat("qwen3", "<think>", "</think>", ReasoningStart.TAGGED),
    "deepseek_r1": ReasoningFormat("deepseek_r1", "<think>", "</think>", ReasoningStart.INSIDE),
}


def reasoning_parser_names() -> list[str]:
    return sorted(_FORMATS)


def get_reasoning_format(name: str) -> ReasoningFormat:
    """The format called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(reasoning_parser_names())
        raise ValueError(f"unknown reasoning parser {name!r}; known: {known}") from None
