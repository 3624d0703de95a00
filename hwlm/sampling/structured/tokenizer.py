"""The grammar library's view of the model's tokenizer, built once per engine (or per tokenizer
for early checks): every token's bytes, so that a grammar over text becomes a mask over ids."""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from hwlm.sampling.structured.library import llguidance

logger = logging.getLogger(__name__)


def build_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> Any:
    """An ``llguidance.LLTokenizer`` over ``vocab_size`` ids: the model's logits may have more
    rows than the tokenizer has tokens (padding), and those ids are never allowed. A grammar
    that has reached its end allows only ``eos_token_ids``."""
    ll = llguidance()
    start = time.perf_counter()
    n_vocab = max(vocab_size, len(hf_tokenizer))
    try:
        tokenizer = ll.hf.from_tokenizer(
            hf_tokenizer, n_vocab=n_vocab, eos_token=list(eos_token_ids) or None
        )
    except ValueError as exc:
        raise ValueError(f"structured outputs need a fast (Rust) tokenizer: {exc}") from exc
    logger.info(
        "structured outputs: llguidance tokenizer of %d ids built in %.2fs",
        n_vocab,
        time.perf_counter() - start,
    )
    return tokenizer


_FOR_CHECKS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def tokenizer_for_checks(hf_tokenizer: Any) -> Any:
    """``build_tokenizer`` for ``hf_tokenizer``'s own vocabulary, cached per tokenizer object
    (the API side checks every request's grammar against the same one)."""
    try:
        return _FOR_CHECKS[hf_tokenizer]
    except (KeyError, TypeError):
        pass
    eos = getattr(hf_tokenizer, "eos_token_id", None)
    built = build_tokenizer(hf_tokenizer, len(hf_tokenizer), () if eos is None else (int(eos),))
    try:
        _FOR_CHECKS[hf_tokenizer] = built
    except TypeError:
        pass  # not weakly referenceable: build again next time
    return built
