"""Compiled grammars, cached by constraint: a request whose schema was seen before starts from a
copy of the compiled matcher (under a microsecond) instead of compiling again (milliseconds to
tens of milliseconds for a JSON schema, docs/sampling.md)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from hwlm.sampling.structured.grammar import GrammarKey, grammar_text, invalid
from hwlm.sampling.structured.library import llguidance
from hwlm.sampling_params import ParameterError

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 256  # distinct constraints kept; the least recently used goes first


class GrammarCache:
    """(kind, spec) -> a compiled matcher at the grammar's start, for one tokenizer. Grammars
    that fail to compile are remembered too, so a repeated bad schema costs nothing."""

    def __init__(self, tokenizer: Any, capacity: int = DEFAULT_CAPACITY) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._entries: OrderedDict[GrammarKey, Any] = OrderedDict()  # matcher or ParameterError
        self.hits = 0
        self.misses = 0

    def matcher(self, key: GrammarKey) -> Any:
        """A fresh matcher for ``key`` (the caller owns it); ParameterError if it cannot
        compile."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            entry = self._compile(key)
            self._entries[key] = entry
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self.hits += 1
            self._entries.move_to_end(key)
        if isinstance(entry, ParameterError):
            raise ParameterError(str(entry), entry.param)
        return entry.deep_copy()

    def _compile(self, key: GrammarKey) -> Any:
        start = time.perf_counter()
        try:
            text = grammar_text(key)
        except ParameterError as exc:
            return exc
        matcher = llguidance().LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            return invalid(key[0], matcher.get_error())
        logger.debug(
            "compiled a %s grammar in %.1f ms", key[0], 1e3 * (time.perf_counter() - start)
        )
        return matcher
