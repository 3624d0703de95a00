"""The outputs of one response's engine requests (one per prompt), merged, and coalesced when
the reader falls behind.

``next_outputs()`` returns, for every stream that has something waiting, only its newest output
(outputs are cumulative, so nothing is lost), and waits only when no stream has anything. A
handler that sends each batch before asking for the next therefore sends one event for all the
steps that ran while its client was slow to take the previous one, and no delay is ever added:
an event merges only outputs that were already waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from hwlm.outputs import RequestOutput
from hwlm.server.engine_seam import OutputStream, abort_all


class OutputFanIn:
    """Reads several ``OutputStream``s; ``close()`` (always, when done) aborts what still runs."""

    def __init__(self, streams: Sequence[OutputStream]) -> None:
        self._streams = list(streams)
        self._live = list(range(len(self._streams)))  # streams that may still yield
        self._held: dict[int, RequestOutput] = {}  # outputs awaited directly, not yet returned
        self._tasks: dict[int, asyncio.Task[RequestOutput]] = {}  # when several streams run

    async def next_outputs(self) -> list[tuple[int, RequestOutput]]:
        """(stream index, newest output) for each stream with something new, in stream order;
        [] once every stream has ended. Raises the error of a stream that failed."""
        while self._live:
            ready = self._take_ready()
            if ready:
                return ready
            await self._wait()
        return []

    async def final_outputs(self) -> list[RequestOutput]:
        """Every stream's finished output, in stream order (for a non-streamed response)."""
        finished: dict[int, RequestOutput] = {}
        while batch := await self.next_outputs():
            finished.update((i, output) for i, output in batch if output.finished)
        if len(finished) != len(self._streams):
            raise RuntimeError("a request ended without a finished output")
        return [finished[i] for i in range(len(self._streams))]

    def close(self) -> None:
        for task in self._tasks.values():
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: nobody will read it
            task.cancel()
        self._tasks.clear()
        abort_all(self._streams)

    def _take_ready(self) -> list[tuple[int, RequestOutput]]:
        ready = []
        for i in list(self._live):
            output = self._take(i)
            if output is not None:
                ready.append((i, output))
                if output.finished:
                    self._live.remove(i)
        return ready

    def _take(self, i: int) -> RequestOutput | None:
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
        if len(self._live) == 1 and idle:  # the common case needs no task
            i = idle[0]
            try:
                self._held[i] = await self._streams[i].__anext__()
            except StopAsyncIteration:
                self._live.remove(i)
            return
        for i in idle:
            self._tasks[i] = asyncio.ensure_future(self._streams[i].__anext__())
        await asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED)
