"""The engine's per-token logprobs in OpenAI's two formats (completions and chat).

Each engine entry maps token id -> Logprob for the top-N tokens plus the sampled one (whose rank
may exceed N). Decoded tokens are filled in by the engine thread; -inf becomes -9999.0 because
JSON has no infinities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hwlm.outputs import Logprob, PromptLogprobs
from hwlm.server.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
)
from hwlm.server.protocol import PromptLogprobs as PromptLogprobsBody

_FLOOR = -9999.0


def _value(logprob: float) -> float:
    return _FLOOR if math.isinf(logprob) or math.isnan(logprob) else max(logprob, _FLOOR)


def _token(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _top(entry: dict[int, Logprob], top_n: int) -> list[tuple[int, Logprob]]:
    """The entry's top ``top_n`` tokens, most likely first."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank)
    return [(token_id, lp) for token_id, lp in ranked if lp.rank <= top_n]


def completion_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[dict[int, Logprob] | None],
    top_n: int,
    text_offset: int,
    unscored: dict[int, str] | None = None,
) -> CompletionLogprobs:
    """Completions' ``logprobs`` for these tokens; ``text_offset`` is where the first one starts
    in the choice's text. ``top_logprobs`` holds the top ``top_n`` plus the sampled token. A None
    entry (an echoed prompt's first token, which nothing predicts) gets null logprobs and its
    text from ``unscored``."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=False):
        if entry is None:
            token = (unscored or {}).get(token_id, "")
            out.tokens.append(token)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(text_offset)
            text_offset += len(token)
            continue
        sampled = entry[token_id]
        token = _token(sampled)
        out.tokens.append(token)
        out.token_logprobs.append(_value(sampled.logprob))
        top = {_token(lp): _value(lp.logprob) for _, lp in _top(entry, top_n)}
        top.setdefault(token, _value(sampled.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int
) -> ChatLogprobs:
    """Chat's ``logprobs.content`` for these tokens, each with its ``top_n`` alternatives."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        sampled = entry[token_id]
        token = _token(sampled)
        content.append(
            TokenLogprob(
                token=token,
                logprob=_value(sampled.logprob),
                bytes=list(token.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(
                        token=_token(lp),
                        logprob=_value(lp.logprob),
                        bytes=list(_token(lp).encode("utf-8")),
                    )
                    for _, lp in _top(entry, top_n)
                ],
            )
        )
    return ChatLogprobs(content=content)


def prompt_logprobs(entries: PromptLogprobs | None) -> PromptLogprobsBody | None:
    """vLLM's ``prompt_logprobs`` field: per prompt token, None (the first) or token id ->
    logprob, rank and decoded token."""
    if entries is None:
        return None
    return [
        None
        if entry is None
        else {
            token_id: PromptLogprob(
                logprob=_value(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token
            )
            for token_id, lp in entry.items()
        }
        for entry in entries
    ]
