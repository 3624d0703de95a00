"""AsyncLLMEngine: one LLMEngine driven by a background thread, used from asyncio.

The engine is not thread-safe, so exactly one thread (the *engine thread*) ever touches it,
including its tokenizer. Callers on any event loop talk to that thread through a thread-safe
inbox of commands (add, abort, call); the engine thread answers each request through the
request's own asyncio queue (``loop.call_soon_threadsafe``). While there is work the thread runs
``step()`` back to back; when idle it blocks on an event, so an idle server costs no CPU.

A request's lifetime:

* ``stream = await engine.add_request(...)`` returns once the engine has accepted the request;
  ValueErrors of ``LLMEngine.add_request`` (bad prompt, too long, ...) are raised here.
* ``async for output in stream`` yields cumulative ``RequestOutput``s, the last with
  ``finished=True``. Outputs that pile up while the consumer is slow are coalesced (they are
  cumulative, so only the newest matters).
* Leaving the stream early -- ``stream.abort()``, ``aclose()``, leaving ``async with stream`` or the
  consuming task being cancelled -- aborts the request in the engine at once, freeing its KV blocks.

If ``step()`` raises, every in-flight request fails with ``EngineDeadError``, ``is_healthy()``
turns False, and later requests are refused with the same error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar

from hwlm.engine.client_stream import EngineDeadError, RequestFailedError
from hwlm.engine.serving_metrics import ServingMetrics, finish_reason
from hwlm.engine.stream_table import StreamTable, num_samples
from hwlm.outputs import RequestOutput
from hwlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
PromptType = str | dict[str, Any] | list[int]


# One class for both engines (the thread here, the engine-core process through its client).
__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "EngineStats",
    "RequestFailedError",
    "RequestStream",
]


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's load, taken on the engine thread."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    num_streams: int  # requests the async layer is still tracking
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which were found there
    num_preemptions: int = 0


# Commands for the engine thread ----------------------------------------------------------------


@dataclass
class _Add:
    stream: RequestStream
    prompt: PromptType
    params: SamplingParams
    stream_outputs: bool
    arrival: float
    priority: int = 0
    group: str | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    future: concurrent.futures.Future[Any]


_Command = _Add | _Abort | _Call


class _Accepted:
    """Posted to a stream once the engine has accepted its request."""


_ACCEPTED = _Accepted()


class RequestStream:
    """The outputs of one request, as an async iterator; leaving it early aborts the request."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, num_seqs: int = 1) -> None:
        self.request_id = request_id
        self.num_seqs = num_seqs  # max(n, best_of): what admission control counts
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | BaseException | _Accepted] = asyncio.Queue()
        self._done = False  # nothing more will be yielded (finished, failed or aborted)

    # Engine-thread side.

    def put(self, item: RequestOutput | BaseException | _Accepted) -> None:
        """Hand an item to the consumer's event loop (thread-safe; dropped if the loop is gone)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            logger.debug("dropping an output of %s: its event loop is closed", self.request_id)

    # Consumer side.

    async def wait_accepted(self) -> None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert item is _ACCEPTED, "the first item of a stream is its acceptance"

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
            while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
                item = self._queue.get_nowait()  # cumulative outputs: keep only the newest
        except BaseException:
            self.abort()  # cancelled while waiting: the consumer is gone
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert isinstance(item, RequestOutput)
        if item.finished:
            self._done = True
        return item

    def take_pending(self) -> RequestOutput | None:
        """The newest output already waiting, or None; never waits. Outputs are cumulative, so
        the ones it passes over hold nothing the newest lacks. Raises the request's error if one
        is waiting."""
        newest: RequestOutput | None = None
        while not self._done and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            assert isinstance(item, RequestOutput)
            newest = item
            self._done = item.finished
        return newest

    def abort(self) -> None:
        """Stop the request if it is still running (idempotent, thread-safe, non-blocking)."""
        if not self._done:
            self._done = True
            self._engine._abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class AsyncLLMEngine:
    """Wraps an ``LLMEngine`` (already built) and starts its engine thread."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # touch only from the engine thread, except immutable config
        self.tokenizer = engine.tokenizer  # for chat templates (pure Python, no tokenization)
        self.max_model_len: int = engine.config.max_model_len
        self.max_logprobs: int = engine.max_logprobs  # -1: no limit
        # The model's generation_config.json sampling defaults (SamplingParams field -> value).
        self.sampling_defaults: dict[str, Any] = dict(getattr(engine, "sampling_defaults", {}))
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()  # guards _streams and _error
        self._streams: StreamTable[RequestStream] = StreamTable()
        # Admission's estimate (num_waiting_sequences), under _lock: the scheduler's waiting
        # sequences as the engine thread last counted them, plus those of requests posted since
        # that the count does not include yet.
        self._num_waiting_seqs = 0
        self._posted_seqs = 0
        self._handled_seqs = 0  # engine thread: of the posted, handled since the last count
        if hasattr(engine, "isolate_request_errors"):
            engine.isolate_request_errors = True  # one request's failure fails only that one
        self._error: EngineDeadError | None = None
        self._stopping = False
        self.metrics = ServingMetrics()  # fed on the engine thread, read anywhere
        self._stats = EngineStats(0, 0, 0, 0, 0)  # replaced on the engine thread, read anywhere
        self._thread = threading.Thread(target=self._run, name="hwlm-engine", daemon=True)
        self._thread.start()

    # Public API -------------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        return self._error is None

    def num_waiting_sequences(self) -> int:
        """Sequences (max(n, best_of) per request) waiting for the scheduler, or on their way
        to it, for admission control: the scheduler's count as of the engine thread's last look
        (after its inbox and after every step), plus the requests posted since."""
        with self._lock:
            return self._num_waiting_seqs + self._posted_seqs

    async def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        *,
        stream: bool = True,
        priority: int = 0,
        group: str | None = None,
    ) -> RequestStream:
        """Queue a request; returns once the engine accepted it. With ``stream`` the returned
        stream yields an output after every token, otherwise only the final one.

        Raises ValueError for a request the engine rejects, EngineDeadError if it is dead."""
        request_stream = RequestStream(self, request_id, num_samples(params))
        with self._lock:
            if self._error is not None:
                raise EngineDeadError(str(self._error))
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = request_stream
            self._posted_seqs += request_stream.num_seqs
        self._post(_Add(request_stream, prompt, params, stream, time.monotonic(), priority, group))
        try:
            await request_stream.wait_accepted()
        except BaseException:
            request_stream.abort()  # cancelled before acceptance: drop it if it was added
            raise
        return request_stream

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        *,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative outputs; errors of ``add_request`` are raised before
        the first output. Stopping early (break, cancellation, aclose) aborts the request; use
        ``contextlib.aclosing`` when breaking out so that this happens at once."""
        request_stream = await self.add_request(request_id, prompt, params, stream=stream)
        async with request_stream:
            async for output in request_stream:
                yield output

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, computed on the engine thread (the tokenizer's owner)."""
        return await self._call(
            lambda e: list(e.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        )

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return await self._call(
            lambda e: e.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        )

    async def token_strings(self, token_ids: list[int]) -> list[str]:
        """The tokenizer's string for each token id (its vocabulary entries)."""
        return await self._call(lambda e: list(e.tokenizer.convert_ids_to_tokens(token_ids)))

    async def get_stats(self) -> EngineStats:
        """The engine's load now (a round trip to the engine thread)."""
        return await self._call(lambda e: self._take_stats())

    def stats_snapshot(self) -> EngineStats:
        """The engine's load as of its last step or inbox drain, without waiting for the engine
        thread. Once the engine is dead nothing runs: the gauges read 0, the counters stay."""
        stats = self._stats
        if self._error is None:
            return stats
        return replace(
            stats, num_running=0, num_waiting=0, num_free_blocks=stats.num_blocks,
            num_streams=0, kv_cache_usage=0.0,
        )  # fmt: skip

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine: in-flight and later requests fail with EngineDeadError at once; then
        wait up to ``timeout`` seconds for the thread to finish its current step (0: don't)."""
        self._fail_all(EngineDeadError("the engine is shut down"))
        self._stopping = True
        self._wakeup.set()
        if timeout > 0:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.0fs", timeout)

    # Internals --------------------------------------------------------------------------------

    def _post(self, command: _Command) -> None:
        self._inbox.put(command)
        self._wakeup.set()

    def _abort(self, request_id: str) -> None:
        with self._lock:
            if self._streams.pop(request_id, None) is None:
                return  # finished, failed or aborted already
        self._post(_Abort(request_id))

    async def _call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(engine)`` on the engine thread and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._error is not None:
                raise EngineDeadError(str(self._error))
            self._post(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        logger.debug("engine thread started")
        try:
            while not self._stopping:
                self._wakeup.clear()  # before draining: a later post sets it again
                self._drain_inbox()
                if self._stopping:
                    break
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._record(outputs)
                    self._stats = self._take_stats()  # before the clients hear of this step
                    self._dispatch(outputs)
                else:
                    self._stats = self._take_stats()
                    self._wakeup.wait()
        except BaseException as exc:
            logger.exception("the engine failed; failing all requests")
            self._fail_all(EngineDeadError(f"the engine failed: {exc!r}"))
        finally:
            self._fail_all(EngineDeadError("the engine is shut down"))
            self._fail_inbox()
        logger.debug("engine thread stopped")

    def _take_stats(self) -> EngineStats:
        """Engine thread only."""
        e, blocks = self.engine, self.engine.block_manager
        return EngineStats(
            num_running=len({s.request_id for s in e.scheduler.running}),
            num_waiting=len({s.request_id for s in e.scheduler.waiting}),
            num_free_blocks=blocks.num_free_blocks,
            num_blocks=blocks.num_blocks,
            num_streams=len(self._streams),
            kv_cache_usage=1.0 - blocks.num_free_blocks / blocks.num_blocks,
            prefix_cache_queries=blocks.prefix_query_tokens,
            prefix_cache_hits=blocks.prefix_hit_tokens,
            num_preemptions=e.scheduler.num_preemptions,
        )

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                self._count_waiting()
                return
            if isinstance(command, _Add):
                self._handle_add(command)
            elif isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
                self.metrics.on_aborted(command.request_id)
            else:
                try:
                    command.future.set_result(command.fn(self.engine))
                except Exception as exc:
                    command.future.set_exception(exc)

    def _count_waiting(self) -> None:
        """Take the scheduler's waiting count (engine thread); the requests handled since the
        last count are in it now (or were refused) and leave the posted total."""
        waiting = self.engine.scheduler.num_waiting_seqs()
        with self._lock:
            self._num_waiting_seqs = waiting
            self._posted_seqs -= self._handled_seqs
            self._handled_seqs = 0

    def _handle_add(self, command: _Add) -> None:
        self._handled_seqs += command.stream.num_seqs
        request_id = command.stream.request_id
        with self._lock:
            if self._streams.get(request_id) is not command.stream:
                return  # aborted before it reached the engine
        try:
            self.engine.add_request(
                request_id,
                command.prompt,
                command.params,
                command.stream_outputs,
                priority=command.priority,
                group=command.group,
            )
        except Exception as exc:
            with self._lock:
                self._streams.pop(request_id, None)
            command.stream.put(exc)
            return
        self.metrics.on_added(request_id, command.arrival)
        command.stream.put(_ACCEPTED)

    def _record(self, outputs: list[RequestOutput]) -> None:
        """Feed the metrics after a step: every running request's output-token count (streamed
        or not), then the requests that finished in it."""
        now = time.monotonic()
        counts: dict[str, list[int]] = {}  # request id -> [output tokens, prompt tokens]
        for seq in self.engine.scheduler.running:
            entry = counts.setdefault(seq.request_id, [0, seq.num_prompt_tokens])
            entry[0] += seq.num_output_tokens
        for output in outputs:
            if output.finished:
                num_output = sum(len(c.token_ids) for c in output.outputs)
                counts[output.request_id] = [num_output, len(output.prompt_token_ids)]
        for request_id, (num_output, num_prompt) in counts.items():
            self.metrics.on_tokens(request_id, num_output, num_prompt, now)
        for output in outputs:
            if output.finished:
                reason = finish_reason([c.finish_reason for c in output.outputs])
                self.metrics.on_finished(output.request_id, reason, now)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        self._count_waiting()
        take_failed = getattr(self.engine, "take_failed_requests", None)
        for request_id, exc in take_failed() if take_failed is not None else []:
            self._fail_request(request_id, exc)
        for output in outputs:
            with self._lock:
                if output.finished:
                    request_stream = self._streams.pop(output.request_id, None)
                else:
                    request_stream = self._streams.get(output.request_id)
            if request_stream is not None:
                try:
                    request_stream.put(self._detach(output))
                except Exception as exc:
                    logger.exception("request %s failed in output processing", output.request_id)
                    self.engine.abort_request(output.request_id)
                    self._fail_request(output.request_id, exc, stream=request_stream)

    def _fail_request(
        self, request_id: str, exc: BaseException, stream: RequestStream | None = None
    ) -> None:
        """Fail one request's stream with RequestFailedError; the engine has dropped it."""
        with self._lock:
            stream = self._streams.pop(request_id, None) or stream
        if stream is not None:
            stream.put(RequestFailedError(f"request {request_id} failed: {exc!r}"))

    def _detach(self, output: RequestOutput) -> RequestOutput:
        """Make ``output`` safe to read on another thread: copy the logprob lists the engine
        keeps appending to, and fill in the decoded tokens (the tokenizer lives here)."""
        for completion in output.outputs:
            if completion.logprobs is None:
                continue
            completion.logprobs = list(completion.logprobs)
            for entry in reversed(completion.logprobs):
                if all(lp.decoded_token is not None for lp in entry.values()):
                    break  # older entries were filled by an earlier step
                for token_id, lp in entry.items():
                    if lp.decoded_token is None:
                        lp.decoded_token = self.tokenizer.decode([token_id])
        return output

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            streams = list(self._streams.values())
            self._streams.clear()
        for request_stream in streams:  # counted first: a client told may scrape /metrics at once
            self.metrics.on_aborted(request_stream.request_id)  # ended without finishing
            request_stream.put(EngineDeadError(str(self._error)))

    def _fail_inbox(self) -> None:
        """Answer the commands that will never run (the thread is exiting)."""
        message = str(self._error or "the engine is shut down")
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Call):
                command.future.set_exception(EngineDeadError(message))
            elif isinstance(command, _Add):
                command.stream.put(EngineDeadError(message))
