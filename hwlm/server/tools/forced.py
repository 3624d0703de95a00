"""The outputs of forced tool calls, which a grammar makes any model write (``tool_choice``
``required`` or a named function; ``hwlm.server.tools.choice`` builds the schemas):

- a named function: the output is its arguments' JSON object, nothing else;
- ``required``: the output is a JSON array of envelopes,
  ``[{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]`` (at least one).

vLLM's server forces calls the same way; the output never depends on the model's own format.
"""

from __future__ import annotations

from hwlm.server.tools.base import Parsed, PartialCall, read_call_array
from hwlm.server.tools.json_scan import InvalidJSON, scan_value, skip_ws


class NamedFunctionFormat:
    """The output is the arguments of ``function``."""

    needs_special_tokens = False

    def __init__(self, function: str) -> None:
        self.name = f"named:{function}"
        self.function = function

    def parse(self, text: str, final: bool) -> Parsed:
        start = skip_ws(text, 0)
        try:
            end = scan_value(text, start)
        except InvalidJSON:
            end = len(text)  # cut short or off-grammar: sent as the arguments it is
        if end is None:
            raw = text[start:]
            if final:  # cut short (max_tokens): the arguments as far as they go
                return Parsed("", [PartialCall(self.function, raw, True)])
            return Parsed("", [PartialCall(self.function, raw, False)])
        return Parsed("", [PartialCall(self.function, text[start:end], True)])


class RequiredFormat:
    """The output is a JSON array of calls."""

    name = "required"
    needs_special_tokens = False

    def parse(self, text: str, final: bool) -> Parsed:
        start = skip_ws(text, 0)
        if start >= len(text) or text[start] != "[":  # nothing yet, or off the grammar
            return Parsed(text if final else "")
        try:  # read as unfinished even when final: an output cut short keeps its calls
            calls, _ = read_call_array(text, start, False)
        except InvalidJSON:
            calls = []
        if not final:
            return Parsed("", calls)
        named = [PartialCall(c.name, c.arguments or "{}", True) for c in calls if c.name]
        return Parsed("", named) if named else Parsed(text)
