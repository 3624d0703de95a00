"""InProcessEngineClient: the engine core on a thread of this process.

One thread (the *engine thread*) owns the ``EngineCore``; the event loop hands it messages
through a thread-safe inbox, and it hands each turn's messages back in one
``loop.call_soon_threadsafe``. While there is work the thread steps back to back; when idle it
blocks on an event, so an idle engine costs no CPU. The messages are the multi-process client's,
passed as objects instead of msgpack.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from hwlm.engine.client import EngineClient
from hwlm.engine.client_stream import EngineDeadError
from hwlm.engine.core import EngineCore
from hwlm.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineDead,
    EngineInput,
    EngineOutput,
    Shutdown,
)
from hwlm.engine_args import EngineArgs

logger = logging.getLogger(__name__)


class InProcessEngineClient(EngineClient):
    """Builds the engine from ``args`` (or takes a built ``core``) and starts its thread."""

    def __init__(self, args: EngineArgs | None = None, *, core: EngineCore | None = None) -> None:
        if core is None:
            if args is None:
                raise ValueError("give EngineArgs or an EngineCore")
            core = EngineCore.from_args(args)
        super().__init__(core.info)
        self._core = core
        self._inbox: queue.SimpleQueue[AddRequest | AbortRequests] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hwlm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._fail_all(EngineDeadError("the engine is shut down"))
        self._stopping = True
        self._wakeup.set()
        if timeout > 0 and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.0fs", timeout)

    # Transport --------------------------------------------------------------------------------

    def _send(self, message: EngineInput) -> None:
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError(str(self._error or "the engine is shut down"))
        if isinstance(message, Shutdown):
            self.shutdown(timeout=0)
            return
        self._inbox.put(message)
        self._wakeup.set()

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        pass  # the engine thread posts to self._loop once it is set

    def _alive(self) -> bool:
        return self._thread.is_alive()

    # The engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        logger.debug("engine thread started")
        try:
            while not self._stopping:
                self._wakeup.clear()  # before draining: a later post sets it again
                messages = self._core.process(self._take_inbox())
                if self._stopping:
                    break
                self._deliver(messages)
                if not self._core.has_work():
                    self._wakeup.wait()
        except Exception as exc:
            logger.exception("the engine failed; failing all requests")
            self._deliver([EngineDead(f"the engine failed: {exc!r}")])
        logger.debug("engine thread stopped")

    def _take_inbox(self) -> list[AddRequest | AbortRequests]:
        messages = []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def _deliver(self, messages: list[EngineOutput]) -> None:
        if not messages:
            return
        loop = self._loop
        if loop is None:  # no request yet: only stats, which need no loop
            self._dispatch_all(messages)
            return
        try:
            loop.call_soon_threadsafe(self._dispatch_all, messages)
        except RuntimeError:  # the client's loop has closed: nobody is listening
            logger.debug("dropping engine messages: the client's event loop is closed")
