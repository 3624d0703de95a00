"""A chat request's ``tools`` and ``tool_choice``: checked, and turned into what the server
does with them (``ToolPlan``): which format reads calls out of the output, and for ``required``
or a named function, the JSON schema that forces the calls (``hwlm.server.tools.forced`` reads
them back).

As in vLLM: ``tool_choice`` defaults to ``auto`` when tools are given and ``none`` otherwise;
``auto`` needs the server's ``--enable-auto-tool-choice`` and ``--tool-call-parser``; ``none``
always works (the tools still reach the chat template, the output is plain content).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hwlm.server.errors import APIError
from hwlm.server.tools.base import ToolFormat
from hwlm.server.tools.forced import NamedFunctionFormat, RequiredFormat

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolSettings:
    """The server's tool flags: ``--enable-auto-tool-choice`` and ``--tool-call-parser``."""

    enable_auto_tool_choice: bool = False
    tool_format: ToolFormat | None = None


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask for. ``tools``: for the chat template (None without tools);
    ``tool_format``: reads calls out of the output (None: no calls, plain content);
    ``schema``: the JSON schema forcing the calls (``required`` or a named function);
    ``max_calls``: 1 with ``parallel_tool_calls: false``."""

    tools: list[dict[str, Any]] | None
    tool_format: ToolFormat | None
    schema: dict[str, Any] | None
    max_calls: int | None


def plan_tools(
    tools: list[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    settings: ToolSettings,
) -> ToolPlan:
    """The plan for a request's tool fields; 400 naming the field at fault."""
    functions = _functions(tools) if tools else {}
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    max_calls = 1 if parallel_tool_calls is False else None
    listed = list(tools) if tools else None
    if choice == "none":
        return ToolPlan(listed, None, None, None)
    if choice == "auto":
        if not functions:
            return ToolPlan(listed, None, None, None)
        if not settings.enable_auto_tool_choice or settings.tool_format is None:
            raise APIError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set on the server",
                param="tool_choice",
            )
        return ToolPlan(listed, settings.tool_format, None, max_calls)
    if not functions:
        raise APIError(f"tool_choice {_show(choice)} needs tools", param="tool_choice")
    if choice == "required":
        schema = _required_schema(functions, max_calls)
        return ToolPlan(listed, RequiredFormat(), schema, max_calls)
    name = _named(choice)
    if name not in functions:
        raise APIError(
            f"tool_choice names the function {name!r}, which is not among the tools",
            param="tool_choice",
        )
    return ToolPlan(listed, NamedFunctionFormat(name), functions[name], 1)


def _functions(tools: list[Any]) -> dict[str, dict[str, Any]]:
    """Each function's name -> its parameters' schema; 400 for a malformed tool."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise APIError(f"{where}: only tools of type 'function' are supported", param="tools")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(f"{where}: needs function.name", param="tools")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = _EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise APIError(f"{where}: function.parameters must be a JSON schema", param="tools")
        if function["name"] in functions:
            raise APIError(f"{where}: duplicate function {function['name']!r}", param="tools")
        functions[function["name"]] = parameters
    return functions


def _named(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
        if isinstance(name, str):
            return name
    raise APIError(
        'tool_choice must be "none", "auto", "required" or '
        '{"type": "function", "function": {"name": ...}}, '
        f"got {_show(choice)}",
        param="tool_choice",
    )


def _required_schema(functions: dict[str, dict[str, Any]], max_calls: int | None) -> dict[str, Any]:
    """A JSON array of at least one call envelope of the given functions."""
    envelopes = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in functions.items()
    ]
    items = envelopes[0] if len(envelopes) == 1 else {"anyOf": envelopes}
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return schema


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
