"""One request's deltas on the API side (``RequestStream``), and the errors a client raises."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from types import TracebackType

from hwlm.engine.messages import RequestDelta, RequestError
from hwlm.sampling_params import ParameterError


class EngineDeadError(RuntimeError):
    """The engine has stopped (a failed step, its process died, or shutdown); no request runs."""


class RequestFailedError(RuntimeError):
    """One request failed while running (say, in its output processing); the others run on."""


class EngineStartupError(RuntimeError):
    """The engine could not be built for a reason other than a bad setting (those raise
    ValueError with the engine's one-line message)."""


def request_error(message: RequestError) -> Exception:
    """The exception a ``RequestError`` message stands for."""
    if not message.rejected:
        return RequestFailedError(message.message)
    if message.param is not None:
        return ParameterError(message.message, message.param)
    return ValueError(message.message)


class _Accepted:
    """Posted to a stream once the engine has accepted its request."""


ACCEPTED = _Accepted()

StreamItem = RequestDelta | BaseException | _Accepted


class RequestStream:
    """The deltas of one request, as an async iterator, the last with ``finished``. Leaving it
    early (``abort()``, ``aclose()``, leaving ``async with``, or the consuming task being
    cancelled) aborts the request in the engine at once, freeing its KV blocks.

    Every delta is kept (they are not cumulative): a slow consumer reads them all, in order."""

    def __init__(self, request_id: str, abort: Callable[[str], None], num_seqs: int = 1) -> None:
        self.request_id = request_id
        self.num_seqs = num_seqs  # max(n, best_of): what admission control counts
        self._abort = abort
        # A deque and one waiter rather than an asyncio.Queue: a stream has one consumer, and
        # this is on the path of every token.
        self._items: deque[StreamItem] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the consumer, waiting for an item
        self._loop: asyncio.AbstractEventLoop | None = None  # the consumer's, once it waited
        self._done = False  # nothing more will be yielded (finished, failed or aborted)

    def put(self, item: StreamItem) -> None:
        """Hand an item to the consumer (on the client's event loop only)."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _get(self) -> StreamItem:
        """The next item, waiting for one if none is there."""
        items = self._items
        while not items:
            waiter = self._waiter = self._new_waiter()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return items.popleft()

    def _new_waiter(self) -> asyncio.Future[None]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.create_future()

    async def wait_accepted(self) -> None:
        item = await self._get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert item is ACCEPTED, "the first item of a stream is its acceptance"

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self._done:
            raise StopAsyncIteration
        items = self._items
        while not items:  # as _get, inline: this is on the path of every token
            waiter = self._waiter = self._new_waiter()
            try:
                await waiter
            except BaseException:
                self.abort()  # cancelled while waiting: the consumer is gone
                raise
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        item = items.popleft()
        if isinstance(item, RequestDelta):
            if item.finished:
                self._done = True
            return item
        self._done = True
        if isinstance(item, BaseException):
            raise item
        raise AssertionError(f"unexpected item {item!r} in the stream of {self.request_id}")

    def next_nowait(self) -> RequestDelta | None:
        """The next delta if one is already waiting, else None (never waits); raises the
        request's error as ``__anext__`` would."""
        if self._done or not self._items:
            return None
        item = self._items.popleft()
        if isinstance(item, RequestDelta):
            self._done = item.finished
            return item
        self._done = True
        if isinstance(item, BaseException):
            raise item
        raise AssertionError(f"unexpected item {item!r} in the stream of {self.request_id}")

    def abort(self) -> None:
        """Stop the request if it is still running (idempotent, non-blocking)."""
        if not self._done:
            self._done = True
            self._abort(self.request_id)

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
