"""Checks and bookkeeping shared by the completions and chat completions handlers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hwlm.outputs import RequestOutput
from hwlm.sampling_params import SamplingParams
from hwlm.server.errors import APIError, invalid_request, quote
from hwlm.server.protocol import SamplingRequest


def check_model(requested: str | None, served_model_name: str) -> None:
    """404 unless the request names the served model (or names none)."""
    if requested is not None and requested != served_model_name:
        raise APIError(
            f"the model {quote(requested)} does not exist; this server serves {served_model_name!r}",
            404,
            param="model",
            code="model_not_found",
        )


def check_logprobs(
    value: int | None, param: str, max_logprobs: int, whole_vocab_ok: bool = False
) -> None:
    """400 naming ``param`` unless ``value`` is None or in [0, max_logprobs] (the engine's
    ``--max-logprobs``; -1: no limit). With ``whole_vocab_ok`` (``prompt_logprobs``), -1 asks
    for the whole vocabulary, which passes only without a limit, as in vLLM."""
    if value is None:
        return
    if value == -1 and whole_vocab_ok:
        if max_logprobs == -1:
            return
        raise APIError(f"{param}=-1 (the whole vocabulary) needs --max-logprobs -1", param=param)
    if max_logprobs == -1:
        if value < 0:
            raise APIError(f"{param} must be non-negative, got {value}", param=param)
    elif not 0 <= value <= max_logprobs:
        raise APIError(
            f"{param} must be between 0 and {max_logprobs} (the server's --max-logprobs), "
            f"got {value}",
            param=param,
        )


def check_context_length(
    num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str
) -> None:
    """400 with vLLM's message when the prompt, or the prompt plus ``max_tokens``, does not fit
    the context window (vLLM rejects such requests rather than shortening ``max_tokens``)."""
    prefix = f"This model's maximum context length is {max_model_len} tokens. However, "
    if num_prompt_tokens >= max_model_len:
        raise APIError(
            prefix + f"your request has {num_prompt_tokens} input tokens. "
            "Please reduce the length of the input.",
            param=param,
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(
            prefix + f"you requested {num_prompt_tokens + max_tokens} tokens "
            f"({num_prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="max_tokens",
        )


def sampling_params(
    request: SamplingRequest,
    max_tokens: int | None,
    logprobs: int | None,
    defaults: dict[str, Any] | None = None,
) -> SamplingParams:
    """The request's SamplingParams, ``defaults`` filling its unset fields; 400 for anything
    unsupported or out of range."""
    problem = request.unsupported()
    if problem is not None:
        raise APIError(problem[0], param=problem[1])
    try:
        return request.sampling_params(max_tokens, logprobs, defaults)
    except ValueError as exc:
        raise invalid_request(exc, type(request).model_fields) from exc


def usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    """OpenAI's ``usage``: each prompt counted once, every sample's tokens."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return usage_counts(prompt, completion)


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
