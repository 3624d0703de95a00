"""MultiProcessEngineClient: the engine core in its own process, over ZeroMQ.

The client binds two sockets on ipc:// paths in a private temporary folder (PUSH for
``EngineInput``, PULL for ``EngineOutput``), starts ``hwlm.engine.core_process`` with the spawn
method (numba's OpenMP and CUDA must not be forked) and waits for its ``EngineInfo``. From the
first request on, a task on the client's event loop reads the engine's messages and routes them
to the request streams.

Failures: the process's sentinel is watched on the event loop, so if the engine dies (even by
SIGKILL), every in-flight request fails with ``EngineDeadError`` within a moment (after any
messages it sent before dying are delivered), ``is_healthy()`` turns False and later requests are
refused. If this process dies, the engine notices and exits by itself (``core_process``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import select
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar, cast

import msgspec
import zmq

from hwlm.engine.client import EngineClient
from hwlm.engine.client_stream import EngineDeadError, EngineStartupError
from hwlm.engine.core_process import run_engine_core
from hwlm.engine.dp_placement import CorePlacement
from hwlm.engine.messages import EngineInfo, EngineInput, Shutdown, StartupFailed, output_decoder
from hwlm.engine_args import EngineArgs

logger = logging.getLogger(__name__)

START_TIMEOUT = 1800.0  # seconds: a download and a first compile can be slow
EXIT_GRACE = 0.1  # seconds to deliver what a dead engine sent before failing its requests

_S = TypeVar("_S", bound=zmq.Socket[Any])


class _EngineProcess:
    """The spawned engine core and the two sockets to it (used from one thread at a time)."""

    owns_engine = True

    def __init__(self, args: EngineArgs, placement: CorePlacement | None = None) -> None:
        placement = placement or CorePlacement()
        self.folder = tempfile.mkdtemp(prefix="hwlm-engine-")
        # The process-wide context, never this object's own: a context collected in the same
        # garbage cycle as its sockets blocks forever in term() (pyzmq's __del__ finds no
        # sockets left to close), and any later gc.collect() may do that collection.
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.input: zmq.Socket[bytes] = self._bind(self.context.socket(zmq.PUSH), "input")
        # Read on the event loop; the sync shadow (which does not own it) serves the handshake.
        self.output: zmq.Socket[bytes] = self._bind(self.context.socket(zmq.PULL), "output")
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=run_engine_core,
            args=(
                msgspec.msgpack.encode(args),
                self._address("input"),
                [self._address("output")],
                logging.getLogger().getEffectiveLevel(),
                False,  # the engine connects to the input this client binds
                None,  # no lifeline: this process is the engine's parent
                placement,
            ),
            name=placement.title,
            daemon=True,  # terminated when this interpreter exits normally
        )
        self.process.start()

    def _address(self, name: str) -> str:
        return f"ipc://{self.folder}/{name}"

    def _bind(self, sock: _S, name: str) -> _S:
        sock.setsockopt(zmq.SNDHWM, 0)  # unbounded queues: a send never blocks
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self._address(name))
        return sock

    @property
    def sentinel(self) -> int:
        """A file descriptor that turns readable when the engine process ends."""
        return int(self.process.sentinel)

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def handshake(self, timeout: float) -> EngineInfo:
        return _handshake(self.output, self.sentinel, self.exitcode, timeout)

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the process to exit, then kill it."""
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine process did not exit within %.0fs; killing it", timeout)
            self.process.kill()
            self.process.join(5)

    def close(self) -> None:
        """Close the sockets (``output`` on the event loop's thread, if one still runs it)."""
        self.input.close(linger=0)
        self.output.close(linger=0)
        shutil.rmtree(self.folder, ignore_errors=True)


class _EngineConnection:
    """Sockets to an engine core that another process started and owns (one of several API
    processes): the input connects to the engine's, the output is bound here, and the engine's
    ``lifeline`` (a pipe end whose writer only the engine holds) reads EOF when it ends."""

    owns_engine = False

    def __init__(self, input_address: str, output_address: str, lifeline: Connection) -> None:
        self.lifeline = lifeline
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.input: zmq.Socket[bytes] = self.context.socket(zmq.PUSH)
        self.input.setsockopt(zmq.SNDHWM, 0)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(input_address)
        self.output: zmq.Socket[bytes] = self.context.socket(zmq.PULL)
        self.output.setsockopt(zmq.RCVHWM, 0)
        self.output.setsockopt(zmq.LINGER, 0)
        self.output.bind(output_address)
        self._ended = False

    @property
    def sentinel(self) -> int:
        return self.lifeline.fileno()

    def exitcode(self) -> int | None:
        """None while the engine runs; -1 once it has ended (its code is its owner's to read)."""
        if not self._ended:
            self._ended = bool(select.select([self.sentinel], [], [], 0)[0])
        return -1 if self._ended else None

    def handshake(self, timeout: float) -> EngineInfo:
        return _handshake(self.output, self.sentinel, self.exitcode, timeout)

    def stop(self, timeout: float) -> None:
        """Nothing to stop: the engine belongs to the process that started it."""

    def close(self) -> None:
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.lifeline.close()


def _handshake(
    output: zmq.Socket[bytes], sentinel: int, exitcode: Callable[[], int | None], timeout: float
) -> EngineInfo:
    """Wait for the engine's ``EngineInfo``; raise what stopped it otherwise."""
    decoder = output_decoder()
    poller = zmq.Poller()
    poller.register(output, zmq.POLLIN)
    poller.register(sentinel, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        events = dict(poller.poll(int(min(left, 1.0) * 1000)))
        if output in events:
            message = decoder.decode(output.recv())
            if isinstance(message, EngineInfo):
                return message
            if isinstance(message, StartupFailed):
                if message.error_type == "ValueError":
                    raise ValueError(message.message)
                raise EngineStartupError(f"{message.error_type}: {message.message}")
        elif sentinel in events:
            raise EngineStartupError(
                f"the engine process exited with code {exitcode()} at start-up"
            )
    raise EngineStartupError(f"the engine did not start within {timeout:.0f}s")


class MultiProcessEngineClient(EngineClient):
    """Starts the engine core process for ``args`` and waits (up to ``start_timeout``
    seconds) until it is built and warmed up. A bad setting raises ValueError with the engine's
    one-line message; other start-up failures raise ``EngineStartupError``."""

    def __init__(
        self,
        args: EngineArgs | None = None,
        *,
        start_timeout: float = START_TIMEOUT,
        _engine: _EngineProcess | _EngineConnection | None = None,
    ) -> None:
        engine = _engine if _engine is not None else _EngineProcess(_required(args))
        try:
            info = engine.handshake(start_timeout)
        except BaseException:
            engine.stop(5)
            engine.close()
            raise
        super().__init__(info)
        self._engine = engine
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = output_decoder()
        self._send_lock = threading.RLock()  # shutdown may come from another thread
        self._reading = False  # the output socket is watched on the event loop
        self._exited = False  # the process's exit was seen on the event loop
        self._closing = False  # shutdown began
        self._closed = False  # shutdown finished: the sockets are closed

    @classmethod
    def connect(
        cls,
        input_address: str,
        output_address: str,
        client_index: int,
        lifeline: Connection,
        *,
        start_timeout: float = START_TIMEOUT,
    ) -> MultiProcessEngineClient:
        """A client of an engine core that another process started (``--api-server-count``):
        it binds ``output_address``, sends to ``input_address`` as client ``client_index``,
        and sees the engine end when ``lifeline`` reads EOF. Its ``shutdown`` leaves the engine
        running (the owner stops it)."""
        engine = _EngineConnection(input_address, output_address, lifeline)
        client = cls(_engine=engine, start_timeout=start_timeout)
        client.client_index = client_index
        return client

    @property
    def pid(self) -> int:
        """The engine process's id."""
        return self.info.pid

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._send_lock:
            if not self._closing and self._engine.owns_engine:
                with contextlib.suppress(zmq.ZMQError):
                    self._engine.input.send(self._encoder.encode(Shutdown()), zmq.NOBLOCK)
            self._closing = True
        self._fail_all(EngineDeadError("the engine is shut down"))
        if timeout <= 0 or self._closed:
            return
        self._engine.stop(timeout)
        self._detach()
        with self._send_lock:
            self._closed = True
            self._engine.close()

    # Transport --------------------------------------------------------------------------------

    def _send(self, message: EngineInput) -> None:
        with self._send_lock:
            if self._closing:
                raise EngineDeadError(str(self._error or "the engine is shut down"))
            try:
                self._engine.input.send(self._encoder.encode(message), zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:  # zmq.Again: no engine at the other end any more
                raise EngineDeadError(f"the engine process cannot be reached: {exc}") from exc

    def _alive(self) -> bool:
        return not self._exited and self._engine.exitcode() is None

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        # ZeroMQ's descriptor is edge-triggered: each wake-up reads every message waiting.
        loop.add_reader(_fd(self._engine.output), self._read_outputs)
        self._reading = True
        loop.call_soon(self._read_outputs)  # any that arrived before the reader was added
        loop.add_reader(self._engine.sentinel, self._on_process_exit)

    def _read_outputs(self) -> None:
        """Dispatch every message waiting (on the event loop, without a task per message)."""
        if not self._reading:
            return
        sock = self._engine.output
        try:
            while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
                self._dispatch(self._decoder.decode(frame.buffer))
        except zmq.Again:
            pass
        except Exception as exc:
            logger.exception("reading the engine's messages failed")
            self._stop_reading()
            self._fail_all(EngineDeadError(f"lost the engine's messages: {exc!r}"))

    def _on_process_exit(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._engine.sentinel)
        self._exited = True
        if not self._closing:
            self._loop.call_later(EXIT_GRACE, self._after_exit)

    def _after_exit(self) -> None:
        """The engine process has died: deliver what it sent, then fail the rest."""
        if self._closing:
            return
        self._read_outputs()
        self._stop_reading()
        code = self._engine.exitcode()
        self._fail_all(EngineDeadError(f"the engine process exited unexpectedly (code {code})"))

    def _detach(self) -> None:
        """Stop reading on the event loop (on its thread), so the sockets can be closed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._on_loop_thread() or not loop.is_running():
            self._detach_now()
            return
        future = asyncio.run_coroutine_threadsafe(self._detach_async(), loop)
        try:
            future.result(timeout=5)
        except Exception:
            logger.warning("could not stop reading the engine's messages on the event loop")

    async def _detach_async(self) -> None:
        self._detach_now()

    def _detach_now(self) -> None:
        assert self._loop is not None
        self._stop_reading()
        if not self._exited:
            self._loop.remove_reader(self._engine.sentinel)

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(_fd(self._engine.output))
        self._reading = False


def _fd(sock: zmq.Socket[bytes]) -> int:
    """The socket's descriptor for the event loop (readable when its events may have changed)."""
    return cast(int, sock.getsockopt(zmq.FD))


def _required(args: EngineArgs | None) -> EngineArgs:
    if args is None:
        raise TypeError("MultiProcessEngineClient needs EngineArgs (or use connect())")
    return args
