"""The engine-core process: ``run_engine_core`` is its entry point (started with spawn by
``MultiProcessEngineClient``; numba's OpenMP and CUDA must not be forked).

It titles itself ``hwlm::engine``, opens its ZeroMQ sockets (PULL for ``EngineInput``; one
PUSH for ``EngineOutput`` per client, connected to the ipc:// path that client bound), builds
the engine and sends ``EngineInfo`` (or ``StartupFailed``) to every client, then loops: take
every input waiting (blocking only when idle), run ``EngineCore.process``, send what it returns,
each message to the client it concerns (``hwlm.engine.core_router``). With one client the input
socket connects to the client's; with several (``--api-server-count``) the engine binds it and
the clients connect. It exits

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
from collections.abc import Callable

import msgspec
import zmq

from hwlm.engine.core_router import OutputRouter
from hwlm.engine.dp_placement import CorePlacement
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

IDLE_POLL_MS = 1000  # the longest an idle engine waits before checking its parent and health
LINGER_MS = 2000  # how long the last messages may take to leave when the engine exits


def run_engine_core(
    args_msgpack: bytes,
    input_address: str,
    output_addresses: list[str],
    log_level: int,
    bind_input: bool = False,
    lifeline: object = None,
    placement: CorePlacement | None = None,
) -> None:
    """The process's main function; ``args_msgpack`` is the ``EngineArgs``, msgpack-encoded.
    ``lifeline`` is held open for the process's life and closes when it ends (whatever holds
    its other end sees the engine die). ``placement``: this core's devices or CPU share and
    title, one of ``--data-parallel-size`` cores (``hwlm.engine.dp_placement``)."""
    import setproctitle

    placement = placement or CorePlacement()
    placement.apply()
    title = placement.title
    setproctitle.setproctitle(title)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=log_level,
            format=f"%(asctime)s %(levelname)s {title} %(name)s: %(message)s",
        )
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.setsockopt(zmq.RCVHWM, 0)
    if bind_input:
        inputs.bind(input_address)
    else:
        inputs.connect(input_address)
    outputs = []
    for address in output_addresses:
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader
        sock.connect(address)
        outputs.append(sock)
    loop = _CoreLoop(inputs, outputs)
    try:
        code = loop.run(args_msgpack)
    finally:
        inputs.close(linger=0)
        for sock in outputs:  # let the last messages leave
            sock.close(linger=0 if loop.parent_gone else LINGER_MS)
        context.term()
    sys.exit(code)


class _CoreLoop:
    def __init__(self, inputs: zmq.Socket[bytes], outputs: list[zmq.Socket[bytes]]) -> None:
        self._inputs = inputs
        self._outputs = outputs
        self._router = OutputRouter(len(outputs))
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
            try:
                inputs = self._receive(not core.has_work(), core.check_health)
            except Exception as exc:  # a part of the engine died while it was idle
                logger.error("the engine failed while idle: %s", exc)
                self._send([EngineDead(f"the engine failed: {exc}")])
                return 1
            if inputs is None:
                return 0
            self._router.note_inputs(inputs)
            try:
                messages = core.process(inputs)
            except Exception as exc:
                logger.exception("an engine step failed; the engine core exits")
                self._send([EngineDead(f"the engine failed: {exc!r}")])
                return 1
            self._send(messages)

    def _receive(
        self, block: bool, check_health: Callable[[], None]
    ) -> list[AddRequest | AbortRequests] | None:
        """Every input waiting (after waiting for one, if ``block``); None: time to exit. While
        waiting, ``check_health`` runs every ``IDLE_POLL_MS`` (it raises if the engine has lost
        a part of itself, such as a tensor-parallel worker)."""
        while True:
            events = dict(self._poller.poll(IDLE_POLL_MS if block else 0))
            if self._parent_gone(events):
                logger.warning("the API process has gone; the engine core exits")
                self.parent_gone = True
                return None
            if self._inputs in events or not block:
                break
            check_health()
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
        for client, message in self._router.route(messages):
            frame = self._encoder.encode(message)
            for sock in self._outputs if client is None else (self._outputs[client],):
                sock.send(frame, copy=False)
