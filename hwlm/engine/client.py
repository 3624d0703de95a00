"""EngineClient: what the API server needs of an engine, wherever the engine runs.

Two implementations speak the same messages (``hwlm.engine.messages``) to the same
``EngineCore``: ``InProcessEngineClient`` (``hwlm.engine.client_inproc``: the core on a thread of
this process) and ``MultiProcessEngineClient`` (``hwlm.engine.client_mp``: the core in its own
process, over ZeroMQ). Everything else, routing the engine's messages to per-request streams
included, is shared here, so the two behave alike.

A request's lifetime:

* ``stream = await client.add_request(request_id, prompt_token_ids, params)`` returns once the
  engine has accepted it; a rejected request raises here (``ParameterError`` naming the field, or
  ValueError), a dead engine raises ``EngineDeadError``.
* ``async for delta in stream`` yields ``RequestDelta``s (new tokens only); the last has
  ``finished``. ``hwlm.engine.client_outputs.RequestOutputAssembler`` turns them into vLLM's
  cumulative ``RequestOutput``s with text.
* If the engine dies, every stream raises ``EngineDeadError``, ``is_healthy()`` turns False and
  later requests are refused.

A client serves one event loop, the first one that adds a request: its streams are fed there.
``shutdown`` may be called from any thread, or after that loop has closed.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType

import msgspec

from hwlm.engine.client_stream import (
    ACCEPTED,
    EngineDeadError,
    EngineStartupError,
    RequestFailedError,
    RequestStream,
    request_error,
)
from hwlm.engine.messages import (
    AbortRequests,
    Accepted,
    AddRequest,
    EngineDead,
    EngineInfo,
    EngineInput,
    EngineOutput,
    EngineStats,
    HistogramCounts,
    RequestDelta,
    RequestError,
    SamplingOptions,
    StepOutputs,
)
from hwlm.engine.serving_metrics import Histogram, MetricsSnapshot
from hwlm.engine.stream_table import StreamTable, num_samples
from hwlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "EngineClient",
    "EngineDeadError",
    "EngineInfo",
    "EngineStartupError",
    "EngineStats",
    "RequestDelta",
    "RequestFailedError",
    "RequestStream",
]


class EngineClient(abc.ABC):
    """The engine as the API server sees it. ``info`` is the engine's handshake."""

    def __init__(self, info: EngineInfo) -> None:
        self.info = info
        self.client_index = 0  # this client's place among the engine's clients (API processes)
        self._streams: StreamTable[RequestStream] = StreamTable()
        self._error: EngineDeadError | None = None
        blocks = info.num_kv_blocks
        self._stats = EngineStats(num_blocks=blocks, num_free_blocks=blocks)
        # Sequences the last stats cannot count yet (num_waiting_sequences): of requests sent
        # and not yet accepted, by request id; and of those accepted since the last stats.
        self._unaccepted: dict[str, int] = {}
        self._accepted_since_stats = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # Requests ---------------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        stream: bool = True,
        arrival_time: float | None = None,
        priority: int = 0,
        group: str | None = None,
    ) -> RequestStream:
        """Queue a request; returns once the engine accepted it. With ``stream`` a delta comes
        after every step that gives it a token, otherwise one when it finishes.
        ``arrival_time`` (``time.monotonic()``) defaults to now."""
        self._bind_loop()
        self._raise_if_dead()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        request_stream = RequestStream(request_id, self._abort, num_samples(params))
        self._streams[request_id] = request_stream
        self._unaccepted[request_id] = request_stream.num_seqs
        arrival = time.monotonic() if arrival_time is None else arrival_time
        options = SamplingOptions.from_params(params)
        try:
            self._send(
                AddRequest(
                    request_id,
                    list(prompt_token_ids),
                    options,
                    stream,
                    arrival,
                    self.client_index,
                    priority,
                    group,
                )
            )
        except BaseException:
            self._streams.pop(request_id, None)
            self._unaccepted.pop(request_id, None)
            raise
        try:
            await request_stream.wait_accepted()
        except BaseException:
            request_stream.abort()  # cancelled before acceptance: drop it if it was added
            raise
        return request_stream

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        stream: bool = True,
    ) -> AsyncIterator[RequestDelta]:
        """``add_request``, then its deltas. Stopping early aborts the request (use
        ``contextlib.aclosing`` when breaking out, so that this happens at once)."""
        request_stream = await self.add_request(request_id, prompt_token_ids, params, stream=stream)
        async with request_stream:
            async for delta in request_stream:
                yield delta

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    # State ------------------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        return self._error is None and self._alive()

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine is dead; None while it is healthy."""
        if self._error is None and not self._alive():
            return EngineDeadError("the engine has stopped")
        return self._error

    def stats_snapshot(self) -> EngineStats:
        """The engine's load and counters as last reported (no round trip). Once the engine is
        dead nothing runs: the gauges read 0, the counters stay."""
        stats = self._stats
        if self.is_healthy():
            return stats
        return msgspec.structs.replace(
            stats, num_running=0, num_waiting=0, num_free_blocks=stats.num_blocks,
            kv_cache_usage=0.0,
        )  # fmt: skip

    def serving_snapshot(self) -> MetricsSnapshot:
        """The request counters and latency histograms of the last stats, in the form
        ``hwlm.server.prometheus`` reads (``ServingMetrics.snapshot()``'s)."""
        stats = self._stats
        snapshot = MetricsSnapshot(
            stats.prompt_tokens, stats.generation_tokens, dict(stats.finished)
        )
        for name in ("ttft", "itl", "e2e"):
            counts: HistogramCounts | None = getattr(stats, name)
            if counts is not None:
                hist: Histogram = getattr(snapshot, name)
                hist.counts, hist.sum, hist.count = list(counts.counts), counts.sum, counts.count
        return snapshot

    def num_unfinished_requests(self) -> int:
        """Requests added here and not yet finished, failed or aborted."""
        return len(self._streams)

    def num_waiting_sequences(self) -> int:
        """Sequences (max(n, best_of) per request) waiting for the scheduler, for admission
        control: the engine's own count as of its last stats (over all its clients: every API
        process), plus this client's requests that count cannot include yet (on their way, or
        accepted since). Samples that finished or run are not counted."""
        pending = sum(self._unaccepted.values()) + self._accepted_since_stats
        return self._stats.num_waiting_seqs + pending

    @abc.abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine: in-flight and later requests fail with EngineDeadError at once;
        then wait up to ``timeout`` seconds for it to stop (0: don't wait; call again later
        to finish). Idempotent; callable from any thread."""

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # Transport hooks ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _send(self, message: EngineInput) -> None:
        """Send ``message`` to the engine core; EngineDeadError if it cannot be reached."""

    @abc.abstractmethod
    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start feeding the engine's messages to ``_dispatch`` on ``loop`` (its first use)."""

    def _alive(self) -> bool:
        """Whether the engine core still runs (its thread or process)."""
        return True

    # Routing (on the client's event loop) --------------------------------------------------------

    def _dispatch_all(self, messages: list[EngineOutput]) -> None:
        for message in messages:
            self._dispatch(message)

    def _dispatch(self, message: EngineOutput) -> None:
        if isinstance(message, StepOutputs):
            for delta in message.outputs:
                if delta.finished:
                    stream = self._streams.pop(delta.request_id, None)
                else:
                    stream = self._streams.get(delta.request_id)
                if stream is not None:
                    stream.put(delta)
        elif isinstance(message, EngineStats):
            self._stats = message  # made after every message before it: counts those requests
            self._accepted_since_stats = 0
        elif isinstance(message, Accepted):
            for request_id in message.request_ids:
                self._accepted_since_stats += self._unaccepted.pop(request_id, 0)
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put(ACCEPTED)
        elif isinstance(message, RequestError):
            self._unaccepted.pop(message.request_id, None)
            stream = self._streams.pop(message.request_id, None)
            if stream is not None:
                stream.put(request_error(message))
        elif isinstance(message, EngineDead):
            self._fail_all(EngineDeadError(message.message))
        else:
            logger.warning("ignoring an unexpected %s from the engine", type(message).__name__)

    # Internals --------------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            raise RuntimeError("an EngineClient serves one event loop, the first that used it")
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._attach(loop)

    def _raise_if_dead(self) -> None:
        error = self.dead_error
        if error is not None:
            raise EngineDeadError(str(error))

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return  # finished, failed or aborted already
        try:
            self._send(AbortRequests([request_id]))
        except EngineDeadError:
            pass  # nothing runs any more

    def _fail_all(self, error: EngineDeadError) -> None:
        """Mark the engine dead and fail every stream with ``error`` (from any thread)."""
        if self._error is None:
            self._error = error
        self._call_on_loop(self._fail_streams)

    def _fail_streams(self) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        self._unaccepted.clear()
        for stream in streams:
            try:
                stream.put(EngineDeadError(str(self._error)))
            except RuntimeError:  # its event loop has closed: nobody is waiting
                pass

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the client's loop: now if on it (or if there is no loop left to feed),
        else soon."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._on_loop_thread():
            fn()
            return
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # closed meanwhile
            fn()
