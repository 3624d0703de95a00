"""A bound on the logprob entries one response may carry, checked before any work.

Every entry (a token and its logprob, sampled or among the top alternatives) costs tens of bytes
of JSON and more as Python objects; ``n`` choices of ``max_tokens`` tokens with ``logprobs``
top tokens, echoed prompts and ``prompt_logprobs`` multiply. ``count_logprob_entries`` is the
most a request can carry; over ``--max-logprob-entries`` it gets a 400 naming ``logprobs``.
Prompts given as text are counted at one token per byte (at most ``max_model_len``), so the
count is an upper bound.
"""

from __future__ import annotations

from typing import Any

from hwlm.server.errors import APIError

_TEMPLATE_TOKENS_PER_MESSAGE = 16  # a chat template's role markers and separators


def prompt_lengths(request: Any, max_model_len: int) -> list[int]:
    """An upper bound on the token count of each prompt the request makes."""
    messages = getattr(request, "messages", None)
    if messages is not None:
        size = 0
        for message in messages:
            size += _TEMPLATE_TOKENS_PER_MESSAGE
            content = message.content
            texts = [content] if isinstance(content, str) else [p.text or "" for p in content or []]
            size += sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        return [min(size, max_model_len)]
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
    ):
        prompt = [prompt]
    lengths = []
    for p in prompt or []:
        size = len(p.encode("utf-8", "surrogatepass")) + 2 if isinstance(p, str) else len(p)
        lengths.append(min(size, max_model_len))
    return lengths


def count_logprob_entries(request: Any, max_model_len: int) -> int:
    """The most logprob entries the response to ``request`` can carry."""
    chat = hasattr(request, "messages")
    if chat:
        top = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens or request.max_tokens
    else:
        top, max_tokens = request.logprobs, request.max_tokens
    n = request.n or 1
    prompt_top = request.prompt_logprobs
    total = 0
    for length in prompt_lengths(request, max_model_len):
        generated = max_tokens if max_tokens is not None else max(0, max_model_len - length)
        if top is not None:
            total += n * generated * (top + 1)
            if not chat and request.echo:
                total += n * length * (top + 1)
        if prompt_top is not None:
            per_token = (prompt_top if prompt_top >= 0 else 2**20) + 1
            total += (1 if chat else n) * length * per_token  # completions: in every choice
    return total


def check_logprob_entries(request: Any, max_model_len: int, limit: int | None) -> None:
    """400 when the response to ``request`` could carry more than ``limit`` logprob entries."""
    if limit is None:
        return
    count = count_logprob_entries(request, max_model_len)
    if count > limit:
        raise APIError(
            f"the response could carry {count} logprob entries (choices x tokens x (top "
            f"logprobs + 1), echoed and prompt tokens included), over the server's limit of "
            f"{limit} (--max-logprob-entries): ask for fewer logprobs, tokens or choices",
            param="logprobs",
        )
