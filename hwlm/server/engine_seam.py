"""The server's one door to the engine: every route reaches the engine through ``EngineSeam``.

What the routes need is small: the model's limits and defaults, its tokenizer (for chat
templates), tokenizing and detokenizing, the load (for admission, health and /metrics), and
submitting requests, each answered by an ``OutputStream`` of cumulative ``RequestOutput``s.
``Seam`` is that interface; ``EngineSeam`` provides it over an ``AsyncLLMEngine`` (the engine on
a thread, the default), ``hwlm.server.engine_seam_mp.ProcessEngineSeam`` over a
``MultiProcessEngineClient`` (``hwlm serve --engine-process``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hwlm.engine.serving_metrics import MetricsSnapshot
from hwlm.outputs import RequestOutput
from hwlm.sampling_params import SamplingParams
from hwlm.server.async_engine import AsyncLLMEngine, EngineDeadError, EngineStats
from hwlm.server.seam_text import SeamText

__all__ = ["EngineDeadError", "EngineSeam", "OutputStream", "Prompt", "Seam", "abort_all"]


@dataclass(frozen=True)
class Prompt:
    """One engine request's prompt: its token ids, and its text when the client sent text."""

    token_ids: list[int]
    text: str | None = None


class OutputStream(Protocol):
    """One request's cumulative outputs, the last with ``finished``."""

    async def __anext__(self) -> RequestOutput:
        """The next output (the newest, if several are waiting); StopAsyncIteration once the
        request has ended; the request's error if it failed."""

    def take_pending(self) -> RequestOutput | None:
        """The newest output already waiting, or None, without waiting."""

    def abort(self) -> None:
        """Stop the request if it still runs (idempotent)."""


def abort_all(streams: Sequence[OutputStream]) -> None:
    for stream in streams:
        stream.abort()


async def submit_all(adds: Sequence[Awaitable[OutputStream]]) -> list[OutputStream]:
    """Await every add: all streams, or none (the ones added are aborted and the first error is
    raised). One add is awaited directly, without gather's tasks."""
    if len(adds) == 1:
        return [await adds[0]]
    results = await asyncio.gather(*adds, return_exceptions=True)
    streams = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        abort_all(streams)
        raise errors[0]
    return streams


class Seam(Protocol):
    """The engine as the routes see it (``EngineSeam`` documents each member)."""

    @property
    def tokenizer(self) -> Any: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def max_logprobs(self) -> int: ...
    @property
    def sampling_defaults(self) -> dict[str, Any]: ...
    def is_healthy(self) -> bool: ...
    def num_waiting_sequences(self) -> int: ...
    def stats_snapshot(self) -> EngineStats: ...
    def metrics_snapshot(self) -> MetricsSnapshot: ...
    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    async def detokenize(self, token_ids: list[int]) -> str: ...
    async def token_strings(self, token_ids: list[int]) -> list[str]: ...
    async def submit(
        self,
        base_id: str,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        stream: bool,
        priority: int = 0,
    ) -> list[OutputStream]: ...


class EngineSeam(SeamText):
    """The engine as the routes see it (its text methods: ``SeamText``)."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self._engine = engine

    # The model ------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """For chat templates and the vocabulary's size; tokenizing goes through ``tokenize``."""
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def max_logprobs(self) -> int:
        """The most logprobs a request may ask for; -1: no limit."""
        return self._engine.max_logprobs

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's generation_config.json sampling defaults (SamplingParams field -> value)."""
        return self._engine.sampling_defaults

    # Load -----------------------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        return self._engine.is_healthy()

    def num_waiting_sequences(self) -> int:
        return self._engine.num_waiting_sequences()

    def stats_snapshot(self) -> EngineStats:
        return self._engine.stats_snapshot()

    def metrics_snapshot(self) -> MetricsSnapshot:
        return self._engine.metrics.snapshot()

    # Requests -------------------------------------------------------------------------------------

    async def submit(
        self,
        base_id: str,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        stream: bool,
        priority: int = 0,
    ) -> list[OutputStream]:
        """One engine request per prompt (ids ``base_id-i``), all or none: if the engine rejects
        one (ValueError, or ParameterError naming the field), the others are aborted and its
        error is raised; EngineDeadError if the engine is dead. With ``stream`` a request reports
        every token, otherwise only its end. ``priority``: the scheduler's priority policy."""
        return await submit_all(
            [
                self._engine.add_request(
                    f"{base_id}-{i}",
                    _engine_prompt(p),
                    params,
                    stream=stream,
                    priority=priority,
                    group=base_id,  # one response's prompts share its seat allowance
                )
                for i, p in enumerate(prompts)
            ]
        )


def _engine_prompt(prompt: Prompt) -> dict[str, Any]:
    if prompt.text is None:
        return {"prompt_token_ids": prompt.token_ids}
    return {"prompt": prompt.text, "prompt_token_ids": prompt.token_ids}
