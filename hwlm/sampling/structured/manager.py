"""The engine's structured outputs: the tokenizer adapter and the grammar cache, built when the
first constrained request arrives (so engines that never see one pay nothing), and a
``GrammarState`` for each constrained request."""

from __future__ import annotations

from typing import Any

from hwlm.sampling.structured.cache import GrammarCache
from hwlm.sampling.structured.grammar import grammar_key
from hwlm.sampling.structured.library import grammar_threads
from hwlm.sampling.structured.state import GrammarState
from hwlm.sampling.structured.tokenizer import build_tokenizer
from hwlm.sampling_params import StructuredOutputsParams


class StructuredOutputs:
    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        """``vocab_size``: the rows of the model's logits (masks cover them all). A bad
        ``HWLM_GRAMMAR_THREADS`` is a ValueError here, when the engine starts."""
        grammar_threads()
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._cache: GrammarCache | None = None

    @property
    def cache(self) -> GrammarCache:
        if self._cache is None:
            tokenizer = build_tokenizer(self._hf_tokenizer, self._vocab_size, self._eos_token_ids)
            self._cache = GrammarCache(tokenizer)
        return self._cache

    def new_state(self, params: StructuredOutputsParams) -> GrammarState:
        """A state at the start of ``params``' grammar; ParameterError (``structured_outputs``)
        if it does not compile."""
        cache = self.cache
        matcher = cache.matcher(grammar_key(params))
        return GrammarState(matcher, int(cache.tokenizer.vocab_size), params.after_token_ids)
