"""The outputs of one response's engine requests (one per prompt), merged, and coalesced when
the reader falls behind.

``next_outputs()`` returns, for every stream that has something waiting, only its newest output
(outputs are cumulative, so nothing is lost), and waits only when no stream has anything. A
handler that sends each batch before asking for the next therefore sends one event for all the
steps that ran while its client was slow to take the previous one, and no delay is ever added:
an event merges only outputs that were already waiting.

The streams are ``OutputStream``s of ``RequestOutput``s, or any streams of the same shape whose
outputs say when they are ``finished`` (the pipeline's ``ChoiceFeed``s of ``Progress``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Generic, Protocol, TypeVar


class _Output(Protocol):
    @property
    def finished(self) -> bool: ...


T = TypeVar("T", bound=_Output)
T_co = TypeVar("T_co", bound=_Output, covariant=True)


class _Stream(Protocol[T_co]):
    async def __anext__(self) -> T_co: ...
    def take_pending(self) -> T_co | None: ...
    def abort(self) -> None: ...


class OutputFanIn(Generic[T]):
    """Reads several streams; ``close()`` (always, when done) aborts what still runs."""

    def __init__(self, streams: Sequence[_Stream[T]]) -> None:
        self._streams = list(streams)
        self._live = list(range(len(self._streams)))  # streams that may still yield
        self._held: dict[int, T] = {}  # outputs awaited directly, not yet returned
        self._tasks: dict[int, asyncio.Task[T]] = {}  # when several streams run

    def next_outputs(self) -> Awaitable[list[tuple[int, T]]]:
        """(stream index, newest output) for each stream with something new, in stream order;
        [] once every stream has ended. Raises the error of a stream that failed."""
        # (Not a coroutine itself: one frame less to resume on every wake-up of a stream.)
        if len(self._streams) == 1:
            return self._next_of_one()
        return self._next_of_several()

    async def _next_of_several(self) -> list[tuple[int, T]]:
        while self._live:
            ready = self._take_ready()
            if ready:
                return ready
            await self._wait()
        return []

    async def final_outputs(self) -> list[T]:
        """Every stream's finished output, in stream order (for a non-streamed response)."""
        finished: dict[int, T] = {}
        while batch := await self.next_outputs():
            finished.update((i, output) for i, output in batch if output.finished)
        if len(finished) != len(self._streams):
            raise RuntimeError("a request ended without a finished output")
        return [finished[i] for i in range(len(self._streams))]

    @property
    def done(self) -> bool:
        """Every stream has ended: ``next_outputs()`` would return []."""
        return not self._live

    def close(self) -> None:
        for task in self._tasks.values():
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: nobody will read it
            task.cancel()
        self._tasks.clear()
        for stream in self._streams:
            stream.abort()

    async def _next_of_one(self) -> list[tuple[int, T]]:
        """``next_outputs`` of a single stream (the common case: no tasks, no bookkeeping)."""
        if not self._live:
            return []
        stream = self._streams[0]
        output = stream.take_pending()
        if output is None:
            try:
                output = await stream.__anext__()
            except StopAsyncIteration:
                self._live.clear()
                return []
            if not output.finished:
                output = stream.take_pending() or output
        if output.finished:
            self._live.clear()
        return [(0, output)]

    def _take_ready(self) -> list[tuple[int, T]]:
        ready = []
        for i in list(self._live):
            output = self._take(i)
            if output is not None:
                ready.append((i, output))
                if output.finished:
                    self._live.remove(i)
        return ready

    def _take(self, i: int) -> T | None:
        """Stream ``i``'s newest output not yet returned, or None."""
        base = self._held.pop(i, None)
        task = self._tasks.get(i)
        if task is not None:
            if not task.done():
                return None  # its stream has nothing waiting
            del self._tasks[i]
            try:
                base = task.result()
            except StopAsyncIteration:
                self._live.remove(i)
                return None
        if base is not None and base.finished:
            return base  # a stream's last output
        return self._streams[i].take_pending() or base

    async def _wait(self) -> None:
        """Until some stream has an output (or has ended)."""
        idle = [i for i in self._live if i not in self._tasks]
        if len(self._live) == 1 and idle:  # one stream left needs no task
            i = idle[0]
            try:
                self._held[i] = await self._streams[i].__anext__()
            except StopAsyncIteration:
                self._live.remove(i)
            return
        for i in idle:
            self._tasks[i] = asyncio.ensure_future(self._streams[i].__anext__())
        await asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED)
