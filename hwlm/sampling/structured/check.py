"""Early checks for the API side: a constraint that cannot compile becomes a clear error before
the request reaches the engine. Results are remembered (per tokenizer and constraint), so a
service that sends one schema with every request checks it once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from hwlm.sampling.structured.grammar import GrammarKey, grammar_key, grammar_text, invalid
from hwlm.sampling.structured.library import llguidance
from hwlm.sampling.structured.tokenizer import tokenizer_for_checks
from hwlm.sampling_params import SamplingParams, StructuredOutputsParams

_REMEMBERED = 256
_results: OrderedDict[tuple[int, GrammarKey], str] = OrderedDict()  # -> error message or ""
_lock = threading.Lock()  # the server checks on worker threads


def check(params: StructuredOutputsParams | SamplingParams, tokenizer: Any = None) -> None:
    """Raise ParameterError (a ValueError whose ``param`` is ``structured_outputs``), with a
    one-line message, if the constraint does not compile; nothing for unconstrained params.
    With ``tokenizer`` (a Hugging Face fast tokenizer) the grammar is also checked against its
    vocabulary (its adapter is built once per tokenizer, about a second for 150k tokens)."""
    if isinstance(params, SamplingParams):
        if params.structured_outputs is None:
            return
        params = params.structured_outputs
    key = grammar_key(params)
    ll_tokenizer = None if tokenizer is None else tokenizer_for_checks(tokenizer)
    remembered = (id(ll_tokenizer), key)
    with _lock:
        message = _results.get(remembered)
    if message is None:
        message = _validate(key, ll_tokenizer)
        with _lock:
            _results[remembered] = message
            if len(_results) > _REMEMBERED:
                _results.popitem(last=False)
    if message:
        raise invalid(key[0], message)


def _validate(key: GrammarKey, ll_tokenizer: Any) -> str:
    """The error message for ``key`` ("" when it compiles)."""
    try:
        text = grammar_text(key)
    except ValueError as exc:
        return str(exc).removeprefix(f"invalid structured_outputs.{key[0]}: ")
    message = str(llguidance().LLMatcher.validate_grammar(text, ll_tokenizer))
    return "" if message.startswith("WARNING") else message
