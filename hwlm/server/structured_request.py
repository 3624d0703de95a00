"""The request fields that constrain the output, mapped to ``StructuredOutputsParams``:

- ``response_format``: ``text`` (none), ``json_object``, ``json_schema`` (``json_schema.schema``;
  ``strict`` is accepted, the schema is always enforced), ``structural_tag``;
- vLLM's ``structured_outputs`` dict: one of ``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``, ``structural_tag`` (``disable_fallback`` accepted: hwlm never falls back);
- vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
  (``guided_decoding_backend`` accepted and ignored: hwlm has one grammar engine).

At most one of them may be given (two are a 400 naming both); a setting hwlm knows but cannot
honour (``guided_whitespace_pattern``, ``structured_outputs.whitespace_pattern``, ...) is a 400
naming it. The grammar itself is checked by the engine's ``check`` (``hwlm.sampling.structured``)
before the request is queued, so a bad schema or regex is a 400 naming the field it came from.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from hwlm.sampling.structured import check as check_grammar
from hwlm.sampling_params import SamplingParams, StructuredOutputsParams
from hwlm.server.errors import APIError

# StructuredOutputsParams' fields that constrain the output; at most one is set.
CONSTRAINT_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_ACCEPTED_KEYS = frozenset({"disable_fallback"})
_UNHONOURED_KEYS = ("whitespace_pattern", "disable_any_whitespace", "disable_additional_properties")
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


@dataclass(frozen=True)
class Constraint:
    """One output constraint: ``StructuredOutputsParams`` keyword arguments (``key``: value)
    and the request field it came from (``param`` of any 400 about it)."""

    key: str
    value: Any
    param: str

    def kwargs(self) -> dict[str, Any]:
        return {self.key: self.value}


def request_constraint(fields: dict[str, Any]) -> Constraint | None:
    """The constraint a request's fields ask for (``fields``: the request's values of
    ``response_format``, ``structured_outputs``, ``guided_*``; absent or None: not given).
    400 for two constraints, a malformed one, or one hwlm cannot honour."""
    if fields.get("guided_whitespace_pattern") is not None:
        raise APIError(
            "guided_whitespace_pattern is not supported (the grammar engine sets whitespace)",
            param="guided_whitespace_pattern",
        )
    found = [
        c
        for c in (
            _response_format(fields.get("response_format")),
            _structured_outputs(fields.get("structured_outputs")),
            *(_guided(name, fields.get(name)) for name in _GUIDED),
        )
        if c is not None
    ]
    if len(found) > 1:
        names = " and ".join(c.param for c in found)
        raise APIError(f"{names} both constrain the output; give only one", param=found[1].param)
    return found[0] if found else None


def conflict_with_tools(constraint: Constraint | None, tool_choice: str) -> None:
    """400 when a constraint and a forced tool call (``required``/named) are both asked."""
    if constraint is not None:
        raise APIError(
            f"tool_choice {tool_choice} forces the output to be tool calls; it cannot be "
            f"combined with {constraint.param}",
            param=constraint.param,
        )


def _response_format(value: Any) -> Constraint | None:
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError("response_format must be an object with a type", param=param)
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", True, param)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(
                "response_format of type json_schema needs a json_schema object", param=param
            )
        if "schema" not in spec:
            raise APIError("response_format.json_schema needs a schema", param=param)
        return Constraint("json", _schema(spec["schema"], param), param)
    if kind == "structural_tag":
        return Constraint("structural_tag", json.dumps(value), param)
    raise APIError(
        "response_format.type must be text, json_object, json_schema or structural_tag, "
        f"got {kind!r}",
        param=param,
    )


def _structured_outputs(value: Any) -> Constraint | None:
    param = "structured_outputs"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError("structured_outputs must be an object", param=param)
    for key in _UNHONOURED_KEYS:
        if value.get(key) not in (None, False):
            raise APIError(f"structured_outputs.{key} is not supported", param=param)
    known = {*CONSTRAINT_KEYS, *_ACCEPTED_KEYS, *_UNHONOURED_KEYS}
    unknown = sorted(k for k in value if k not in known)
    if unknown:
        raise APIError(f"structured_outputs: unknown field(s) {', '.join(unknown)}", param=param)
    keys = [k for k in CONSTRAINT_KEYS if value.get(k) not in (None, False)]
    if len(keys) > 1:
        raise APIError(f"structured_outputs sets {' and '.join(keys)}; give only one", param=param)
    if not keys:
        return None
    return _checked(keys[0], value[keys[0]], param)


def _guided(name: str, value: Any) -> Constraint | None:
    if value is None:
        return None
    return _checked(_GUIDED[name], value, name)


def _checked(key: str, value: Any, param: str) -> Constraint:
    """The constraint ``key: value`` after checking the value's type."""
    if key == "json":
        return Constraint(key, _schema(value, param), param)
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise APIError(f"{param}: the choices must be a non-empty list of strings", param=param)
        return Constraint(key, list(value), param)
    if key == "json_object":
        if value is not True:
            raise APIError(f"{param}: json_object must be true", param=param)
        return Constraint(key, True, param)
    if not isinstance(value, str) or not value:
        raise APIError(f"{param}: the {key} must be a non-empty string", param=param)
    return Constraint(key, value, param)


def _schema(value: Any, param: str) -> dict[str, Any]:
    """A JSON schema given as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(
                f"{param}: the JSON schema is not valid JSON: {exc}", param=param
            ) from exc
    if not isinstance(value, dict):
        raise APIError(f"{param}: a JSON schema must be an object", param=param)
    return value


def constrain(
    params: SamplingParams, constraint: Constraint, after_token_ids: list[int] | None = None
) -> None:
    """Set ``params.structured_outputs`` to ``constraint`` (applying once the output holds
    ``after_token_ids``, when given); 400 naming the constraint's field if it is malformed."""
    try:
        params.structured_outputs = StructuredOutputsParams(
            **constraint.kwargs(), after_token_ids=after_token_ids
        )
    except ValueError as exc:
        raise APIError(str(exc), param=constraint.param) from exc


async def check_constraint(params: SamplingParams, constraint: Constraint, tokenizer: Any) -> None:
    """400 naming the constraint's field if the grammar engine cannot compile it (a bad schema,
    regex or grammar), before the request is queued. Compiling runs off the event loop."""
    try:
        await asyncio.to_thread(check_grammar, params, tokenizer)
    except ValueError as exc:
        raise APIError(str(exc), param=constraint.param) from exc
