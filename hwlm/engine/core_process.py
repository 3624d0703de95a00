"""The engine-core process: ``run_engine_core`` is its entry point (started with spawn by
``MultiProcessEngineClient``; numba's OpenMP and CUDA must not be forked).

It titles itself ``hwlm::engine``, connects to the client's two ZeroMQ sockets (PULL for
``EngineInput``, PUSH for ``EngineOutput``; ipc:// paths the client bound), builds the engine
and sends ``EngineInfo`` (or ``StartupFailed``), then loops: take every input waiting (blocking
only when idle), run ``EngineCore.process``, send what it returns. It exits

* on ``Shutdown``;
* when a step fails, after sending ``EngineDead``;
* by itself when the API process dies: its end of the pipe multiprocessing keeps to the parent
  (``parent_process().sentinel``) reads EOF, or, should another process hold that pipe open,
  ``os.getppid()`` changes, checked at least once a second.

Ctrl-C in a terminal reaches every process of the group; the engine ignores SIGINT and leaves
stopping to the API process, which drains its HTTP requests first.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys

import msgspec
import zmq

from hwlm.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineDead,
    EngineOutput,
    Shutdown,
    StartupFailed,
    input_decoder,
)

logger = logging.getLogger(__name__)

PROCESS_TITLE = "hwlm::engine"
IDLE_POLL_MS = 1000  # the longest an idle engine waits before checking on its parent
LINGER_MS = 2000  # how long the last messages may take to leave when the engine exits


def run_engine_core(
    args_msgpack: bytes, input_address: str, output_address: str, log_level: int
) -> None:
    """The process's main function; ``args_msgpack`` is the ``EngineArgs``, msgpack-encoded."""
    import setproctitle

    setproctitle.setproctitle(PROCESS_TITLE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=log_level,
            format=f"%(asctime)s %(levelname)s {PROCESS_TITLE} %(name)s: %(message)s",
        )
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader
    outputs.connect(output_address)
    loop = _CoreLoop(inputs, outputs)
    try:
        code = loop.run(args_msgpack)
    finally:
        inputs.close(linger=0)
        outputs.close(linger=0 if loop.parent_gone else LINGER_MS)  # let the last ones leave
        context.term()
    sys.exit(code)


class _CoreLoop:
    def __init__(self, inputs: zmq.Socket[bytes], outputs: zmq.Socket[bytes]) -> None:
        self._inputs = inputs
        self._outputs = outputs
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = input_decoder()
        self._parent_pid = os.getppid()
        self.parent_gone = False
        self._poller = zmq.Poller()
        self._poller.register(inputs, zmq.POLLIN)
        parent = multiprocessing.parent_process()
        self._parent_fd = parent.sentinel if parent is not None else None
        if self._parent_fd is not None:
            self._poller.register(self._parent_fd, zmq.POLLIN)

    def run(self, args_msgpack: bytes) -> int:
        """Build the engine and serve; the process's exit code."""
        from hwlm.engine.core import EngineCore
        from hwlm.engine_args import EngineArgs

        try:
            args = msgspec.msgpack.decode(args_msgpack, type=EngineArgs)
            core = EngineCore.from_args(args)
        except Exception as exc:
            logger.debug("engine start-up failed", exc_info=exc)
            message = " ".join(str(exc).split()) or repr(exc)  # one line
            self._send([StartupFailed(message, type(exc).__name__)])
            return 1
        self._send([core.info])
        logger.info("engine core ready (pid %d)", os.getpid())
        while True:
            inputs = self._receive(block=not core.has_work())
            if inputs is None:
                return 0
            try:
                messages = core.process(inputs)
            except Exception as exc:
                logger.exception("an engine step failed; the engine core exits")
                self._send([EngineDead(f"the engine failed: {exc!r}")])
                return 1
            self._send(messages)

    def _receive(self, block: bool) -> list[AddRequest | AbortRequests] | None:
        """Every input waiting (after waiting for one, if ``block``); None: time to exit."""
        while True:
            events = dict(self._poller.poll(IDLE_POLL_MS if block else 0))
            if self._parent_gone(events):
                logger.warning("the API process has gone; the engine core exits")
                self.parent_gone = True
                return None
            if self._inputs in events or not block:
                break
        received: list[AddRequest | AbortRequests] = []
        while True:
            try:
                frame = self._inputs.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return received
            message = self._decoder.decode(frame.buffer)
            if isinstance(message, Shutdown):
                logger.info("shutting down")
                return None
            received.append(message)

    def _parent_gone(self, events: dict[object, int]) -> bool:
        if self._parent_fd is not None and self._parent_fd in events:
            return True
        return os.getppid() != self._parent_pid

    def _send(self, messages: list[EngineOutput]) -> None:
        for message in messages:
            self._outputs.send(self._encoder.encode(message), copy=False)
