"""A ``StructuredOutputsParams`` as the grammar library's grammar text, and its cache key.

Every kind becomes an llguidance grammar (a JSON document the matcher compiles):

- ``json``: the schema through llguidance's JSON-schema compiler, on one line with Python's
  ``json.dumps`` separators (``", "`` and ``": "``), not vLLM's default of any whitespace
  between tokens: with free whitespace a model that is unsure (a small one, or random weights)
  can spend all of ``max_tokens`` on blanks (vLLM's ``disable_any_whitespace`` exists for this).
  A schema may choose otherwise with llguidance's own options, e.g.
  ``"x-guidance": {"whitespace_flexible": true}`` (``JSON_DEFAULTS`` are only defaults).
- ``json_object``: the schema ``{"type": "object"}`` (any JSON object).
- ``regex``: Rust ``regex`` syntax; the whole output must match.
- ``choice``: one of the strings, exactly.
- ``grammar``: llguidance's Lark dialect, or llama.cpp's GBNF (recognised by ``::=``).
- ``structural_tag``: vLLM's JSON form, ``{"structures": [{"begin", "schema", "end"}],
  "triggers": [...]}``, as llguidance's structural tags: free text, and after a trigger (matched
  as text) the structure that begins with it.
"""

from __future__ import annotations

import json
from typing import Any

from hwlm.sampling.structured.library import llguidance
from hwlm.sampling_params import ParameterError, StructuredOutputsParams

# llguidance's JSON options unless the schema's "x-guidance" says otherwise.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

GrammarKey = tuple[str, str]  # (kind, spec): one compiled grammar per distinct constraint


def grammar_key(params: StructuredOutputsParams) -> GrammarKey:
    """The constraint as a hashable key: equal constraints share one compiled grammar."""
    kind = params.kind
    value = getattr(params, kind)
    if kind == "json" and isinstance(value, dict):
        value = _dumps(value)
    elif kind == "choice":
        value = _dumps(value)
    elif kind == "json_object":
        value = ""
    return kind, str(value)


def grammar_text(key: GrammarKey) -> str:
    """The llguidance grammar of ``key``; ParameterError for a spec that cannot be read."""
    ll = llguidance()
    kind, spec = key
    try:
        if kind == "json":
            return str(ll.LLMatcher.grammar_from_json_schema(_schema(spec), JSON_DEFAULTS))
        if kind == "json_object":
            return str(ll.LLMatcher.grammar_from_json_schema('{"type": "object"}', JSON_DEFAULTS))
        if kind == "structural_tag":
            return _structural_tag(ll, spec)
        return str(ll.grammar_from(kind, spec))  # regex, choice, grammar (Lark or GBNF)
    except ParameterError:
        raise
    except (ValueError, TypeError, KeyError, AssertionError) as exc:
        raise invalid(kind, str(exc)) from exc


def invalid(kind: str, message: str) -> ParameterError:
    """The one-line error for a constraint that does not compile."""
    line = " ".join(message.split())
    if len(line) > 300:
        line = line[:297] + "..."
    return ParameterError(f"invalid structured_outputs.{kind}: {line}", "structured_outputs")


def _schema(spec: str) -> str:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise invalid("json", f"not valid JSON: {exc}") from exc
    if not isinstance(schema, dict | bool):
        raise invalid("json", f"a JSON schema is an object, got {type(schema).__name__}")
    return spec


def _structural_tag(ll: Any, spec: str) -> str:
    try:
        tag = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise invalid("structural_tag", f"not valid JSON: {exc}") from exc
    if not isinstance(tag, dict) or not isinstance(tag.get("structures"), list):
        raise invalid("structural_tag", 'expected {"structures": [...], "triggers": [...]}')
    triggers = [str(t) for t in tag.get("triggers", [])]
    tags = []
    for item in tag["structures"]:
        begin = str(item["begin"])
        trigger = next((t for t in triggers if t and begin.startswith(t)), None)
        if trigger is None:
            raise invalid("structural_tag", f"no trigger starts the structure {begin!r}")
        schema = item.get("schema", {})
        if isinstance(schema, dict):  # the same JSON layout as a json constraint's
            schema = {"x-guidance": JSON_DEFAULTS, **schema}
        tags.append(
            ll.StructTag(trigger=trigger, begin=begin, grammar=schema, end=str(item.get("end", "")))
        )
    if not tags:
        raise invalid("structural_tag", "no structures")
    # Triggers match text: whether "<tool_call>" is one special token depends on the tokenizer,
    # and the grammar's text must not (it is cached by constraint).
    grammar = str(ll.StructTag.to_grammar(tags, assume_special=False))
    if grammar.startswith("{"):  # already llguidance's JSON form (a Lark grammar inside)
        return grammar
    return str(ll.LLMatcher.grammar_from_lark(grammar))


def _dumps(value: Any) -> str:
    # Keys keep their order: a schema's property order is the order of the output's keys.
    return json.dumps(value, ensure_ascii=False)
