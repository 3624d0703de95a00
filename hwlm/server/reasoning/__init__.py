"""Reasoning models' thinking, split from the answer (``--reasoning-parser``)."""

from hwlm.server.reasoning.base import ReasoningFormat, ReasoningStart, Split, split_reasoning
from hwlm.server.reasoning.registry import get_reasoning_format, reasoning_parser_names

__all__ = [
    "ReasoningFormat",
    "ReasoningStart",
    "Split",
    "get_reasoning_format",
    "reasoning_parser_names",
    "split_reasoning",
]
