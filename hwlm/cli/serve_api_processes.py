"""``hwlm serve --api-server-count N``: N API server processes sharing the port, one engine core.

The process ``hwlm serve`` runs in becomes a supervisor. It has already bound the port; it
starts the engine core (``hwlm::engine``) and N API processes (``hwlm::api<i>``), all with
spawn. Each API process gets a duplicate of the listening sockets (the kernel hands every new
connection to one of them), its own client of the engine (``MultiProcessEngineClient.connect``:
its requests carry its index, and the engine sends their outputs to its socket only), and the
read end of the engine's *lifeline*, a pipe whose only writer is the engine process, so that
every API process sees the engine end (/health turns 503, streams end with an error) without
asking the supervisor.

Stopping: SIGTERM to the supervisor is passed to every API process, which drains its requests
(``--shutdown-timeout``) and exits; then the supervisor stops the engine and exits 0. SIGINT
from a terminal reaches the whole process group, so the supervisor only waits. If an API
process dies, the supervisor stops the others and the engine and exits 1; if the supervisor
dies, the engine and the API processes exit by themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import msgspec
import zmq

from hwlm.engine.core_process import run_engine_core
from hwlm.engine.messages import Shutdown
from hwlm.engine_args import from_cli_args

logger = logging.getLogger(__name__)

ENGINE_STOP_TIMEOUT = 10.0  # seconds the engine core gets to exit once the API processes have


def serve_with_api_processes(args: argparse.Namespace, sockets: list[socket.socket]) -> int:
    """Run the engine core and ``args.api_server_count`` API processes until stopped; the exit
    code (0 when every API process exited cleanly)."""
    if not args.engine_process:
        raise ValueError("--api-server-count above 1 needs the engine in its own process")
    folder = tempfile.mkdtemp(prefix="hwlm-engine-")
    try:
        return _Supervisor(args, sockets, folder).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Supervisor:
    def __init__(self, args: argparse.Namespace, sockets: list[socket.socket], folder: str):
        self.args = args
        self.count: int = args.api_server_count
        self.input_address = f"ipc://{folder}/input"
        self.output_addresses = [f"ipc://{folder}/output-{i}" for i in range(self.count)]
        self.spawn = multiprocessing.get_context("spawn")
        self.stopping = False
        lifeline_read, lifeline_write = self.spawn.Pipe(duplex=False)
        self.engine = self._start_engine(lifeline_write)
        lifeline_write.close()  # the engine holds the only writer now
        self.apis = [self._start_api(i, sockets, lifeline_read) for i in range(self.count)]
        lifeline_read.close()

    def _start_engine(self, lifeline: Connection) -> BaseProcess:
        process = self.spawn.Process(
            target=run_engine_core,
            args=(
                msgspec.msgpack.encode(from_cli_args(self.args)),
                self.input_address,
                self.output_addresses,
                logging.getLogger().getEffectiveLevel(),
                True,  # the engine binds the input: every API process connects to it
                lifeline,
            ),
            name="hwlm::engine",
        )
        process.start()
        return process

    def _start_api(
        self, index: int, sockets: list[socket.socket], lifeline: Connection
    ) -> BaseProcess:
        process = self.spawn.Process(
            target=run_api_process,
            args=(
                self.args,
                sockets,
                self.input_address,
                self.output_addresses[index],
                index,
                lifeline,
                logging.getLogger().getEffectiveLevel(),
            ),
            name=f"hwlm::api{index}",
        )
        process.start()
        return process

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_engine()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if signum == signal.SIGTERM:  # SIGINT from a terminal reached them already
            for api in self.apis:
                with contextlib.suppress(ProcessLookupError):
                    if api.pid is not None:
                        os.kill(api.pid, signal.SIGTERM)

    def _watch(self) -> int:
        """Until every API process has exited; 1 if one failed."""
        engine_seen_dead = False
        failed = False
        while any(api.exitcode is None for api in self.apis):
            running = [api.sentinel for api in self.apis if api.exitcode is None]
            watched = running if engine_seen_dead else [*running, self.engine.sentinel]
            wait(watched, timeout=1.0)
            if not engine_seen_dead and self.engine.exitcode is not None:
                engine_seen_dead = True
                if not self.stopping:
                    logger.error("the engine process exited (code %s)", self.engine.exitcode)
            for api in self.apis:
                if api.exitcode not in (None, 0) and not failed:
                    failed = True
                    logger.error("%s exited with code %s; stopping", api.name, api.exitcode)
                    self._terminate_apis()
        return 1 if failed or any(api.exitcode != 0 for api in self.apis) else 0

    def _terminate_apis(self) -> None:
        self.stopping = True
        for api in self.apis:
            if api.exitcode is None and api.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(api.pid, signal.SIGTERM)

    def _stop_engine(self) -> None:
        if self.engine.exitcode is None:
            context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self.input_address)
            sock.send(msgspec.msgpack.encode(Shutdown()))
            sock.close()
        self.engine.join(ENGINE_STOP_TIMEOUT)
        if self.engine.exitcode is None:
            logger.warning("the engine process did not stop; killing it")
            self.engine.kill()
            self.engine.join(5)


def run_api_process(
    args: argparse.Namespace,
    sockets: list[socket.socket],
    input_address: str,
    output_address: str,
    index: int,
    lifeline: Connection,
    log_level: int,
) -> None:
    """One API process: a client of the shared engine core, serving HTTP on ``sockets``."""
    import setproctitle

    from hwlm.cli.serve import _serve, _SignalGuard
    from hwlm.engine.client_mp import MultiProcessEngineClient
    from hwlm.server.engine_seam_mp import ProcessEngineSeam

    setproctitle.setproctitle(f"hwlm::api{index}")
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s api{index} %(name)s: %(message)s"
    )
    guard = _SignalGuard()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, guard)
    try:
        client = MultiProcessEngineClient.connect(input_address, output_address, index, lifeline)
    except KeyboardInterrupt:
        raise SystemExit(0) from None
    except Exception as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None
    _exit_with_supervisor(guard)
    try:
        code = _serve(args, sockets, guard, (client, ProcessEngineSeam(client)))
    finally:
        client.shutdown()
    raise SystemExit(code)


def _exit_with_supervisor(guard: Any) -> None:
    """Stop serving should the supervisor die (a thread waits on its pipe's end)."""
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        logger.warning("the supervisor has gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
