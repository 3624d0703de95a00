"""The server's seam over the engine core in its own process (``hwlm serve --engine-process``).

``ProcessEngineSeam`` gives the routes what ``EngineSeam`` gives them, over a
``MultiProcessEngineClient``: the limits and sampling defaults come from the engine's handshake,
the tokenizer is loaded here from the handshake's tokenizer path (tokenizing, detokenizing and
chat templates happen in this process), and each request's deltas become cumulative
``RequestOutput``s through a ``RequestOutputAssembler``. The client's errors are raised as the
server's own (``EngineDeadError`` answers 503), so the routes cannot tell the two seams apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from hwlm.engine import client_stream
from hwlm.engine.client_mp import MultiProcessEngineClient
from hwlm.engine.client_outputs import RequestOutputAssembler
from hwlm.engine.messages import RequestDelta
from hwlm.outputs import RequestOutput
from hwlm.sampling_params import SamplingParams
from hwlm.server.async_engine import EngineDeadError, EngineStats
from hwlm.server.engine_seam import OutputStream, Prompt, abort_all
from hwlm.server.metrics import MetricsSnapshot
from hwlm.text.tokenizer import load_tokenizer

T = TypeVar("T")

OFF_LOOP_CHARS = 8192  # texts (and token lists) longer than this are tokenized on a thread


class ProcessOutputStream:
    """One request's cumulative outputs, assembled from the client's deltas (``OutputStream``)."""

    def __init__(
        self, stream: client_stream.RequestStream, assembler: RequestOutputAssembler
    ) -> None:
        self._stream = stream
        self._assembler = assembler

    async def __anext__(self) -> RequestOutput:
        delta = await _server_errors(self._stream.__anext__())
        output = self._fold(delta)
        newer = self.take_pending()
        return output if newer is None else newer

    def take_pending(self) -> RequestOutput | None:
        newest: RequestOutput | None = None
        while (delta := _translated(self._stream.next_nowait)) is not None:
            newest = self._fold(delta)
        return newest

    def abort(self) -> None:
        self._stream.abort()

    def _fold(self, delta: RequestDelta) -> RequestOutput:
        try:
            return self._assembler.add(delta)
        except Exception as exc:
            self._stream.abort()
            raise client_stream.RequestFailedError(
                f"request {self._assembler.request_id} failed: {exc!r}"
            ) from exc


class ProcessEngineSeam:
    """The engine as the routes see it (``Seam``), the engine core running in its own process.
    Does not own ``client``: whoever built it shuts it down."""

    def __init__(self, client: MultiProcessEngineClient, tokenizer: Any | None = None) -> None:
        self._client = client
        self._tokenizer = (
            tokenizer if tokenizer is not None else load_tokenizer(client.info.tokenizer)
        )

    # The model ------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._client.info.max_model_len

    @property
    def max_logprobs(self) -> int:
        return self._client.info.max_logprobs

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        return dict(self._client.info.sampling_defaults)

    # Load -----------------------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        return self._client.is_healthy()

    def num_waiting_requests(self) -> int:
        return self._client.num_waiting_requests()

    def stats_snapshot(self) -> EngineStats:
        s = self._client.stats_snapshot()
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks,
            num_blocks=s.num_blocks,
            num_streams=self._client.num_unfinished_requests(),
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
        )

    def metrics_snapshot(self) -> MetricsSnapshot:
        return self._client.serving_snapshot()

    # Text -----------------------------------------------------------------------------------------

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._tokenizer
        return await _maybe_off_loop(
            len(text), lambda: list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
        )

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``, special tokens included."""
        tok = self._tokenizer
        return await _maybe_off_loop(
            len(token_ids), lambda: str(tok.decode(token_ids, skip_special_tokens=False))
        )

    async def token_strings(self, token_ids: list[int]) -> list[str]:
        return list(self._tokenizer.convert_ids_to_tokens(token_ids))

    # Requests -------------------------------------------------------------------------------------

    async def submit(
        self, base_id: str, prompts: Sequence[Prompt], params: SamplingParams, *, stream: bool
    ) -> list[OutputStream]:
        """As ``EngineSeam.submit``: all or none, the first error raised."""
        results = await asyncio.gather(
            *(self._add(f"{base_id}-{i}", p, params, stream) for i, p in enumerate(prompts)),
            return_exceptions=True,
        )
        streams: list[OutputStream] = [r for r in results if isinstance(r, ProcessOutputStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            abort_all(streams)
            raise errors[0]
        return streams

    async def _add(
        self, request_id: str, prompt: Prompt, params: SamplingParams, stream: bool
    ) -> ProcessOutputStream:
        assembler = RequestOutputAssembler(
            request_id, prompt.token_ids, params, self._tokenizer, prompt=prompt.text, stream=stream
        )
        request_stream = await _server_errors(
            self._client.add_request(request_id, prompt.token_ids, params, stream=stream)
        )
        return ProcessOutputStream(request_stream, assembler)


async def _maybe_off_loop(size: int, fn: Callable[[], T]) -> T:
    """``fn()``, on a worker thread when the input is big (so the event loop keeps serving)."""
    if size > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn)
    return fn()


async def _server_errors(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``, raising the client's EngineDeadError as the server's."""
    try:
        return await awaitable
    except client_stream.EngineDeadError as exc:
        raise EngineDeadError(str(exc)) from exc


def _translated(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except client_stream.EngineDeadError as exc:
        raise EngineDeadError(str(exc)) from exc
