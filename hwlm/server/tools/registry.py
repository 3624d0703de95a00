"""Tool-call formats by the names of vLLM's ``--tool-call-parser``."""

from __future__ import annotations

from collections.abc import Callable

from hwlm.server.tools.base import ToolFormat
from hwlm.server.tools.hermes import HermesFormat
from hwlm.server.tools.llama3_json import Llama3JsonFormat
from hwlm.server.tools.mistral import MistralFormat

_FORMATS: dict[str, Callable[[], ToolFormat]] = {
    "hermes": HermesFormat,
    "llama3_json": Llama3JsonFormat,
    "mistral": MistralFormat,
}


def tool_parser_names() -> list[str]:
    return sorted(_FORMATS)


def get_tool_format(name: str) -> ToolFormat:
    """The format called ``name``; ValueError naming the known ones otherwise."""
    try:
        factory = _FORMATS[name]
    except KeyError:
        known = ", ".join(tool_parser_names())
        raise ValueError(f"unknown tool-call parser {name!r}; known: {known}") from None
    return factory()
