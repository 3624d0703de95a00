"""Tool calling: reading calls out of a model's output in the formats real models write
(``--tool-call-parser``: hermes, llama3_json, mistral), whole or streamed as OpenAI's deltas,
and forcing calls with a grammar (``tool_choice`` ``required`` or a named function)."""

from hwlm.server.tools.base import Parsed, PartialCall, ToolFormat
from hwlm.server.tools.registry import get_tool_format, tool_parser_names
from hwlm.server.tools.streaming import (
    ExtractedToolCalls,
    ToolCall,
    ToolCallStreamer,
    extract_tool_calls,
)

__all__ = [
    "ExtractedToolCalls",
    "Parsed",
    "PartialCall",
    "ToolCall",
    "ToolCallStreamer",
    "ToolFormat",
    "extract_tool_calls",
    "get_tool_format",
    "tool_parser_names",
]
