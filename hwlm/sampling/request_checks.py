"""Checks of a request's SamplingParams that need the model: token ids inside the vocabulary,
logprob counts under the engine's ``max_logprobs``, and ``bad_words`` tokenized."""

from __future__ import annotations

from typing import Any

from hwlm.sampling_params import ParameterError, SamplingParams


def check_params(params: SamplingParams, vocab_size: int, max_logprobs: int, stream: bool) -> None:
    """Raise ParameterError naming the parameter and its allowed range."""
    for name, ids in (
        ("stop_token_ids", params.stop_token_ids or []),
        ("allowed_token_ids", params.allowed_token_ids or []),
        ("logit_bias", list(params.logit_bias or {})),
    ):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ParameterError(
                f"{name} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})", name
            )
    limit = vocab_size if max_logprobs == -1 else max_logprobs
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        asked = vocab_size if value == -1 else value
        if asked is not None and asked > limit:
            raise ParameterError(
                f"{name} must be in [0, {limit}] (the engine's max_logprobs), got {value}", name
            )
    assert params.best_of is not None
    if stream and params.best_of > params.n:
        raise ParameterError(
            f"best_of must equal n={params.n} when streaming (best_of > n picks the best samples "
            f"only at the end), got {params.best_of}",
            "best_of",
        )


def tokenize_bad_words(tokenizer: Any, words: list[str], vocab_size: int) -> list[list[int]]:
    """Token-id sequences to ban for each word: as written (leading spaces stripped) and with
    one leading space, since most tokenizers spell a word differently mid-sentence."""
    out: list[list[int]] = []
    for word in words:
        variants = []
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
            if ids and ids not in variants:
                variants.append(ids)
        if not variants:
            raise ParameterError(
                f"bad_words entries must tokenize to at least one token: {word!r}", "bad_words"
            )
        for ids in variants:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ParameterError(
                    f"bad_words {word!r} tokenizes to ids {bad} outside the vocabulary "
                    f"[0, {vocab_size})",
                    "bad_words",
                )
        out.extend(variants)
    return out
