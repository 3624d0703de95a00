"""`hwlm bench throughput --structured-json`: the same workload with a JSON schema on every
request, timed beside the unconstrained run on the same engine (docs/sampling.md).

Two built-in schemas:

- ``builtin``: what services typically send (a pydantic model, OpenAI's strict mode): nested
  objects, arrays, enums, bounded numbers, optional fields, ``additionalProperties: false``, and
  plain strings.
- ``builtin-bounded``: the same shape with length bounds, a pattern and a format on its strings,
  a documented worst case: llguidance's masks inside a bounded string cost about 15x more host
  time than inside a plain one (docs/sampling.md, "Cost per step").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PLAIN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {
            "type": "array",
            "items": {"type": "number", "minimum": 0, "maximum": 100},
            "maxItems": 8,
        },
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string"},
            },
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
    "additionalProperties": False,
}

# PLAIN_SCHEMA with bounds on its strings: maxLength, a pattern and a format.
BOUNDED_SCHEMA: dict[str, Any] = json.loads(json.dumps(PLAIN_SCHEMA))
BOUNDED_SCHEMA["properties"]["name"]["maxLength"] = 40
BOUNDED_SCHEMA["properties"]["email"]["format"] = "email"
BOUNDED_SCHEMA["properties"]["address"]["properties"]["zip"]["pattern"] = "^[0-9]{5}$"
BOUNDED_SCHEMA["properties"]["tags"]["items"]["maxLength"] = 12

BUILTIN_SCHEMAS: dict[str, dict[str, Any]] = {
    "builtin": PLAIN_SCHEMA,
    "builtin-bounded": BOUNDED_SCHEMA,
}
BUILTIN_SCHEMA = PLAIN_SCHEMA  # the default built-in schema


def add_structured_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--structured-json",
        metavar="SCHEMA",
        default=None,
        help="also time the workload with this JSON schema on every request (a file, "
        "'builtin' for a typical one with plain strings, or 'builtin-bounded' for the same with "
        "string length bounds, a pattern and a format: a worst case), on the same engine; "
        "reports the ratio and the host time spent on the grammars per step",
    )


def load_schema(spec: str) -> dict[str, Any]:
    """``spec``: a built-in schema's name or a path to a JSON schema file; ValueError in one line
    otherwise."""
    if spec in BUILTIN_SCHEMAS:
        return BUILTIN_SCHEMAS[spec]
    try:
        schema = json.loads(Path(spec).read_text())
    except (OSError, ValueError) as exc:
        names = ", ".join(BUILTIN_SCHEMAS)
        raise ValueError(
            f"--structured-json: cannot read a JSON schema from {spec!r} (nor is it one of "
            f"{names}): {exc}"
        ) from exc
    if not isinstance(schema, dict):
        raise ValueError(
            f"--structured-json: {spec!r} holds a {type(schema).__name__}, not a schema"
        )
    return schema
