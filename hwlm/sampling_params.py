"""Sampling controls with vLLM's names, defaults and validation.

Every out-of-range value raises a ``ParameterError`` (a ValueError) that names the parameter and
its allowed range, and carries the parameter's name in ``param``.
Checks that need the model (token ids inside the vocabulary, bad words tokenized) happen when the
engine accepts the request: ``LLMEngine.add_request``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_GREEDY_EPS = 1e-5
_MIN_TEMPERATURE = 1e-2  # smaller positive temperatures are raised to this, as in vLLM
MAX_LOGIT_BIAS = 100.0
_SEED_RANGE = (-(2**63), 2**64 - 1)


class ParameterError(ValueError):
    """A request parameter is invalid; ``param`` is its name (a ``SamplingParams`` field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[ParameterError], tuple[str, str]]:
        return type(self), (str(self), self.param)  # picklable: engine and server may be apart


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop (vLLM's semantics).

    - ``n`` completions are returned per prompt; ``best_of`` (default ``n``) are sampled and the
      ``n`` with the highest cumulative log-probability kept.
    - Penalties: ``presence_penalty`` and ``frequency_penalty`` (in [-2, 2]) subtract from the
      logits of tokens already generated (once, or once per occurrence); ``repetition_penalty``
      (> 0) divides positive and multiplies negative logits of tokens in the prompt or output.
    - ``temperature`` 0 means greedy. ``top_k`` 0 or -1 disables it; ``top_p`` 1.0 disables it;
      ``min_p`` 0 disables it. ``seed`` makes one request reproducible whatever else shares its
      batch.
    - ``stop`` strings end generation at the first occurrence, cut from the text unless
      ``include_stop_str_in_output``; ``stop_token_ids`` end it on a token (kept in the text unless
      special). ``CompletionOutput.stop_reason`` says which one ended it.
    - ``bad_words`` are never generated (multi-token words: their last token is banned whenever
      the tokens before it were just generated). ``logit_bias`` adds to the logits of the given
      token ids (each in [-100, 100]); ``allowed_token_ids`` restricts sampling to that set.
    - ``min_tokens``: EOS (even with ``ignore_eos``) and ``stop_token_ids`` are masked until that
      many tokens exist.
    - ``logprobs`` = N returns, per generated token, the N most likely tokens plus the sampled one,
      with ranks (log-probabilities of the model's raw distribution); -1 means the whole
      vocabulary. ``prompt_logprobs`` = N does the same for every prompt token after the first.
    - ``structured_outputs`` constrains the output to a JSON schema, a regex, a choice or a
      grammar (``StructuredOutputsParams``; docs/sampling.md).
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._validate()
        if self.greedy:  # as vLLM: greedy ignores the truncation controls
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        elif self.temperature < _MIN_TEMPERATURE:
            logger.warning(
                "temperature %s is below %s and was raised to it",
                self.temperature,
                _MIN_TEMPERATURE,
            )
            self.temperature = _MIN_TEMPERATURE

    def _normalise(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        self.bad_words = list(dict.fromkeys(self.bad_words or []))
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.logit_bias is not None:
            self.logit_bias = _int_keys(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = _structured_from_dict(self.structured_outputs)

    def _validate(self) -> None:
        _check_counts(self)
        _check_penalties(self)
        _check_truncation(self)
        _check_lengths(self)
        _check_logprobs(self)
        _check_stops(self)
        _check_token_controls(self)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ParameterError(
                "structured_outputs must be a StructuredOutputsParams (or a dict of its fields), "
                f"got {type(self.structured_outputs).__name__}",
                "structured_outputs",
            )

    # Derived properties -----------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def argmax_only(self) -> bool:
        """Greedy, with no token controls, penalties or logprobs: the next token is the argmax
        of the raw logits."""
        return self.argmax_within_grammar and self.structured_outputs is None

    @property
    def argmax_within_grammar(self) -> bool:
        """``argmax_only`` but for a grammar: the next token is the argmax of the logits the
        grammar allows (all of them without one)."""
        return (
            self.greedy
            and self.logprobs is None
            and self.allowed_token_ids is None
            and not self.bad_words
            and self.min_tokens == 0
            and not self.logit_bias
            and not self.has_penalties
        )

    @property
    def needs_output_history(self) -> bool:
        """Whether sampling the next token reads the tokens generated so far (a grammar's mask
        depends on every token before it)."""
        return (
            self.has_penalties
            or bool(self.bad_words)
            or self.min_tokens > 0
            or self.structured_outputs is not None
        )

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (also when reassigned after construction)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def output_text_buffer_length(self) -> int:
        """Characters a stream must hold back so a stop string can still be cut from it."""
        if not self.stop_strings or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop_strings) - 1

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's names): exactly one of

    - ``json``: a JSON schema (a dict or its JSON text); ``json_object=True``: any JSON object;
    - ``regex``: the whole output matches it (Rust ``regex`` syntax, as llguidance reads it);
    - ``choice``: the output is one of these strings;
    - ``grammar``: a context-free grammar in llguidance's Lark dialect or llama.cpp's GBNF;
    - ``structural_tag``: vLLM's JSON text ``{"structures": [{"begin", "schema", "end"}],
      "triggers": [...]}``: free text in which each structure, once its trigger appears, follows
      its schema.

    ``after_token_ids`` (hwlm's extension): the constraint applies only once the output contains
    this token sequence (for instance the tokens of ``</think>`` of a reasoning model); before,
    the output is free. None: from the first token. Errors name the field
    ``structured_outputs`` (``ParameterError.param``)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    after_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINT_KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ParameterError(
                f"structured_outputs needs exactly one of {', '.join(CONSTRAINT_KINDS)}; "
                f"got {found}",
                "structured_outputs",
            )
        _check_constraint(self, given[0])
        if self.after_token_ids is not None:
            ids = self.after_token_ids
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ParameterError(
                    f"structured_outputs.after_token_ids must be a non-empty list of token ids, "
                    f"got {ids!r}",
                    "structured_outputs",
                )
            if any(t < 0 for t in ids):
                raise ParameterError(
                    f"structured_outputs.after_token_ids must be non-negative, got {ids!r}",
                    "structured_outputs",
                )
            self.after_token_ids = list(ids)

    @property
    def kind(self) -> str:
        """The field that holds the constraint (one of ``CONSTRAINT_KINDS``)."""
        return next(n for n in CONSTRAINT_KINDS if getattr(self, n) not in (None, False))


CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _check_constraint(p: StructuredOutputsParams, kind: str) -> None:
    value = getattr(p, kind)
    ok = {
        "json": isinstance(value, str | dict),
        "regex": isinstance(value, str),
        "grammar": isinstance(value, str) and bool(value.strip()),
        "structural_tag": isinstance(value, str),
        "json_object": value is True,
        "choice": isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(c, str) for c in value),
    }[kind]
    if not ok:
        wanted = {
            "json": "a JSON schema (a dict or a JSON string)",
            "regex": "a string",
            "grammar": "a non-empty string",
            "structural_tag": "a JSON string",
            "json_object": "True",
            "choice": "a non-empty list of strings",
        }[kind]
        raise ParameterError(
            f"structured_outputs.{kind} must be {wanted}, got {value!r:.200}", "structured_outputs"
        )
    if kind == "choice":
        p.choice = list(value)


def _structured_from_dict(fields: dict[str, Any]) -> StructuredOutputsParams:
    known = set(StructuredOutputsParams.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ParameterError(
            f"structured_outputs has unknown fields {unknown}; known: {sorted(known)}",
            "structured_outputs",
        )
    return StructuredOutputsParams(**fields)


def _int_keys(bias: dict[Any, float]) -> dict[int, float]:
    try:
        return {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError) as exc:
        raise ParameterError(
            f"logit_bias must map integer token ids to numbers, got {bias!r}", "logit_bias"
        ) from exc


def _require_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}", name
        )


def _require_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value!r}", name)


def _check_counts(p: SamplingParams) -> None:
    _require_int("n", p.n)
    if p.n < 1:
        raise ParameterError(f"n must be at least 1, got {p.n}", "n")
    _require_int("best_of", p.best_of)
    assert p.best_of is not None
    if p.best_of < p.n:
        raise ParameterError(f"best_of must be at least n={p.n}, got {p.best_of}", "best_of")
    if p.seed is not None:
        _require_int("seed", p.seed)
        lo, hi = _SEED_RANGE
        if not lo <= p.seed <= hi:
            raise ParameterError(
                f"seed must be in [{lo}, {hi}] (or -1/None for none), got {p.seed}", "seed"
            )


def _check_penalties(p: SamplingParams) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        _require_finite(name, value)
        if not -2.0 <= value <= 2.0:
            raise ParameterError(f"{name} must be in [-2, 2], got {value}", name)
    _require_finite("repetition_penalty", p.repetition_penalty)
    if p.repetition_penalty <= 0.0:
        raise ParameterError(
            f"repetition_penalty must be greater than 0 (range (0, inf)), got {p.repetition_penalty}",
            "repetition_penalty",
        )


def _check_truncation(p: SamplingParams) -> None:
    _require_finite("temperature", p.temperature)
    if p.temperature < 0.0:
        raise ParameterError(
            f"temperature must be non-negative (range [0, inf)), got {p.temperature}", "temperature"
        )
    _require_finite("top_p", p.top_p)
    if not 0.0 < p.top_p <= 1.0:
        raise ParameterError(f"top_p must be in (0, 1], got {p.top_p}", "top_p")
    _require_int("top_k", p.top_k)
    if p.top_k < 0:
        raise ParameterError(
            f"top_k must be 0 or -1 (disable), or at least 1, got {p.top_k}", "top_k"
        )
    _require_finite("min_p", p.min_p)
    if not 0.0 <= p.min_p <= 1.0:
        raise ParameterError(f"min_p must be in [0, 1], got {p.min_p}", "min_p")
    if p.greedy and p.best_of is not None and p.best_of > 1:
        name, value = ("n", p.n) if p.n > 1 else ("best_of", p.best_of)
        raise ParameterError(
            f"{name} must be 1 when using greedy sampling (temperature 0), got {value}", name
        )


def _check_lengths(p: SamplingParams) -> None:
    if p.max_tokens is not None:
        _require_int("max_tokens", p.max_tokens)
        if p.max_tokens < 1:
            raise ParameterError(f"max_tokens must be at least 1, got {p.max_tokens}", "max_tokens")
    _require_int("min_tokens", p.min_tokens)
    if p.min_tokens < 0:
        raise ParameterError(
            f"min_tokens must be non-negative (range [0, max_tokens]), got {p.min_tokens}",
            "min_tokens",
        )
    if p.max_tokens is not None and p.min_tokens > p.max_tokens:
        raise ParameterError(
            f"min_tokens must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens}",
            "min_tokens",
        )


def _check_logprobs(p: SamplingParams) -> None:
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        if value is None:
            continue
        _require_int(name, value)
        if value < -1:
            raise ParameterError(
                f"{name} must be non-negative, or -1 for the whole vocabulary, got {value}", name
            )


def _check_stops(p: SamplingParams) -> None:
    if not all(isinstance(s, str) for s in p.stop_strings):
        raise ParameterError(f"stop must be a string or a list of strings, got {p.stop!r}", "stop")
    if any(not s for s in p.stop_strings):
        raise ParameterError("stop cannot contain an empty string", "stop")
    if p.stop_strings and not p.detokenize:
        raise ParameterError("stop strings need detokenize=True", "stop")
    assert p.stop_token_ids is not None
    for t in p.stop_token_ids:
        _require_int("stop_token_ids", t)
        if t < 0:
            raise ParameterError(
                f"stop_token_ids must be non-negative token ids, got {t}", "stop_token_ids"
            )


def _check_token_controls(p: SamplingParams) -> None:
    assert p.bad_words is not None
    if not all(isinstance(w, str) and w for w in p.bad_words):
        raise ParameterError(
            f"bad_words must be non-empty strings, got {p.bad_words!r}", "bad_words"
        )
    for token_id, bias in (p.logit_bias or {}).items():
        if token_id < 0:
            raise ParameterError(
                f"logit_bias token ids must be non-negative, got {token_id}", "logit_bias"
            )
        _require_finite("logit_bias", bias)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ParameterError(
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {bias} for token {token_id}",
                "logit_bias",
            )
    if p.allowed_token_ids is not None:
        if not p.allowed_token_ids:
            raise ParameterError(
                "allowed_token_ids must not be empty (give None for no restriction)",
                "allowed_token_ids",
            )
        for t in p.allowed_token_ids:
            _require_int("allowed_token_ids", t)
            if t < 0:
                raise ParameterError(
                    f"allowed_token_ids must be non-negative token ids, got {t}",
                    "allowed_token_ids",
                )
