"""The engine's logprobs as OpenAI's JSON (completions' and chat's formats, and vLLM's
``prompt_logprobs``), built as plain dicts ready to encode.

Each engine entry maps token id -> Logprob for the top-N tokens plus the sampled one (whose rank
may exceed N). Decoded tokens are filled in by the engine; -inf becomes -9999.0 because JSON has
no infinities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hwlm.outputs import Logprob, PromptLogprobs

_FLOOR = -9999.0

JSONDict = dict[str, Any]


def _value(logprob: float) -> float:
    return _FLOOR if math.isinf(logprob) or math.isnan(logprob) else max(logprob, _FLOOR)


def _token(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _top(entry: dict[int, Logprob], top_n: int) -> list[Logprob]:
    """The entry's top ``top_n`` tokens, most likely first."""
    ranked = sorted(entry.values(), key=lambda lp: lp.rank)
    return [lp for lp in ranked if lp.rank <= top_n]


def completion_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[dict[int, Logprob] | None],
    top_n: int,
    text_offset: int,
    unscored: dict[int, str] | None = None,
) -> JSONDict:
    """Completions' ``logprobs`` for these tokens; ``text_offset`` is where the first one starts
    in the choice's text. ``top_logprobs`` holds the top ``top_n`` plus the sampled token. A None
    entry (an echoed prompt's first token, which nothing predicts) gets null logprobs and its
    text from ``unscored``."""
    offsets: list[int] = []
    values: list[float | None] = []
    tokens: list[str] = []
    tops: list[dict[str, float] | None] = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        if entry is None:
            token = (unscored or {}).get(token_id, "")
            value: float | None = None
            top = None
        else:
            sampled = entry[token_id]
            token, value = _token(sampled), _value(sampled.logprob)
            top = {_token(lp): _value(lp.logprob) for lp in _top(entry, top_n)}
            top.setdefault(token, value)
        offsets.append(text_offset)
        values.append(value)
        tokens.append(token)
        tops.append(top)
        text_offset += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": values,
        "tokens": tokens,
        "top_logprobs": tops,
    }


def concat_logprobs(first: JSONDict | None, second: JSONDict | None) -> JSONDict | None:
    """Two runs of completions' ``logprobs`` as one (None: absent)."""
    if first is None or second is None:
        return first or second
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(
    token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]], top_n: int
) -> JSONDict:
    """Chat's ``logprobs`` for these tokens, each with its ``top_n`` alternatives."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        sampled = entry[token_id]
        content.append(
            {
                **_chat_token(sampled),
                "top_logprobs": [_chat_token(lp) for lp in _top(entry, top_n)],
            }
        )
    return {"content": content}


def _chat_token(lp: Logprob) -> JSONDict:
    token = _token(lp)
    return {"token": token, "logprob": _value(lp.logprob), "bytes": list(token.encode("utf-8"))}


def prompt_logprobs(entries: PromptLogprobs | None) -> list[JSONDict | None] | None:
    """vLLM's ``prompt_logprobs`` field: per prompt token, None (the first) or token id ->
    logprob, rank and decoded token."""
    if entries is None:
        return None
    return [
        None
        if entry is None
        else {
            str(token_id): {
                "logprob": _value(lp.logprob),
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for token_id, lp in entry.items()
        }
        for entry in entries
    ]
