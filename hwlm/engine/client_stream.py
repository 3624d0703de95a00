"""One request's deltas on the API side (``RequestStream``), and the errors a client raises."""

from __future__ import annotations

import asyncio
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

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._abort = abort
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._done = False  # nothing more will be yielded (finished, failed or aborted)

    def put(self, item: StreamItem) -> None:
        """Hand an item to the consumer (on the client's event loop only)."""
        self._queue.put_nowait(item)

    async def wait_accepted(self) -> None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert item is ACCEPTED, "the first item of a stream is its acceptance"

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            self.abort()  # cancelled while waiting: the consumer is gone
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert isinstance(item, RequestDelta)
        if item.finished:
            self._done = True
        return item

    def next_nowait(self) -> RequestDelta | None:
        """The next delta if one is already waiting, else None (never waits); raises the
        request's error as ``__anext__`` would."""
        if self._done or self._queue.empty():
            return None
        item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert isinstance(item, RequestDelta)
        self._done = item.finished
        return item

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
