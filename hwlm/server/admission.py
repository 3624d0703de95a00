"""What a request must pass before a handler sees it: the server's configured limits, known chat
roles, room in the waiting queue, and a server that is not shutting down.

The limits are flags of ``hwlm serve`` (see docs/reliability.md); each breach is a 4xx OpenAI error
body naming the parameter, except a full queue and a draining server, which are 503 with
``Retry-After`` so that clients and load balancers back off and retry elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hwlm.server.errors import APIError, quote

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits (None: no limit beyond the model's own) and the waiting-queue bound."""

    max_request_bytes: int = 8 * 2**20
    max_tokens: int | None = None
    max_n: int = 16
    max_stop_strings: int = 16
    max_waiting_requests: int | None = 1024  # counted in sequences (see num_sequences), per core
    engine_cores: int = 1  # --data-parallel-size: the queue holds this many cores' bounds
    max_logprob_entries: int | None = 2**18  # in one response (see hwlm.server.logprob_budget)
    body_timeout_s: float = 60.0  # to receive a request's whole body
    metrics_require_key: bool = False  # /metrics needs the API key too


def check_request(request: Any, limits: ServerLimits) -> None:
    """400 for the first field of a completion or chat request over its configured limit, and for
    chat messages with a role the chat format does not know."""
    for name in ("n", "best_of"):  # best_of samples are sequences too
        value = getattr(request, name, None)
        if value is not None and value > limits.max_n:
            raise APIError(f"{name} must be at most {limits.max_n}, got {value}", param=name)
    _check_max_tokens(request, limits)
    stop = getattr(request, "stop", None)
    num_stop = 1 if isinstance(stop, str) else len(stop or [])
    if num_stop > limits.max_stop_strings:
        raise APIError(
            f"at most {limits.max_stop_strings} stop strings are allowed, got {num_stop}",
            param="stop",
        )
    for i, message in enumerate(getattr(request, "messages", None) or []):
        if message.role not in CHAT_ROLES:
            raise APIError(
                f"messages[{i}].role {quote(message.role)} is not one of {sorted(CHAT_ROLES)}",
                param="messages",
            )


def _check_max_tokens(request: Any, limits: ServerLimits) -> None:
    if limits.max_tokens is None:
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name, None)
        if value is not None and value > limits.max_tokens:
            raise APIError(f"{name} must be at most {limits.max_tokens}, got {value}", param=name)


def num_prompts(request: Any) -> int:
    """How many engine requests a completion or chat request becomes (one per prompt)."""
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def num_sequences(request: Any) -> int:
    """How many sequences a completion or chat request runs: each prompt's ``best_of`` (at
    least ``n``) samples."""
    samples = max(getattr(request, "n", 1) or 1, getattr(request, "best_of", None) or 1)
    return num_prompts(request) * samples


def check_capacity(
    num_waiting: int, limits: ServerLimits, draining: bool, incoming: int = 1
) -> None:
    """503 with Retry-After while the server drains for shutdown, or when ``incoming`` more
    sequences would overfill the waiting queue (``num_waiting`` accepted but not yet scheduled,
    over all engine cores, which hold ``max_waiting_requests`` each); 400 for a request with more
    sequences (prompts x samples) than one core's queue can ever hold (a request runs on one)."""
    if draining:
        raise APIError(
            "the server is shutting down", 503, headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    bound = limits.max_waiting_requests
    if bound is not None and incoming > bound:
        raise APIError(
            f"a request may run at most {bound} sequences (prompts x max(n, best_of)), got "
            f"{incoming}",
            param="prompt",
        )
    total = None if bound is None else bound * limits.engine_cores
    if total is not None and num_waiting + incoming > total:
        raise APIError(
            f"the server is overloaded: {num_waiting} requests are waiting (the limit is "
            f"{total}); retry later",
            503,
            code="server_overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
