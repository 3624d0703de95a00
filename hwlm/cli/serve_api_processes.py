"""``hwlm serve --api-server-count N``: N API server processes sharing the port, one engine core
(or ``--data-parallel-size`` cores, each of which every API process reaches).

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

With several engine cores, each has its own input socket, one output socket per API process and
its own lifeline; every API process holds a client of each (``DataParallelEngineClient``).
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
from hwlm.engine.dp_placement import CorePlacement, plan_placements
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
        placements = plan_placements(from_cli_args(args), getattr(args, "data_parallel_size", 1))
        cores = range(len(placements))
        self.input_addresses = [f"ipc://{folder}/input-{c}" for c in cores]
        self.output_addresses = [  # [core][API process]
            [f"ipc://{folder}/output-{c}-{i}" for i in range(self.count)] for c in cores
        ]
        self.spawn = multiprocessing.get_context("spawn")
        self.stopping = False
        lifelines = [self.spawn.Pipe(duplex=False) for _ in placements]
        self.engines = [
            self._start_engine(p, write)
            for p, (_, write) in zip(placements, lifelines, strict=True)
        ]
        readers = []
        for read, write in lifelines:
            write.close()  # the engine holds the only writer now
            readers.append(read)
        self.apis = [self._start_api(i, sockets, readers) for i in range(self.count)]
        for read in readers:
            read.close()

    def _start_engine(self, placement: CorePlacement, lifeline: Connection) -> BaseProcess:
        core = placement.index
        process = self.spawn.Process(
            target=run_engine_core,
            args=(
                msgspec.msgpack.encode(from_cli_args(self.args)),
                self.input_addresses[core],
                self.output_addresses[core],
                logging.getLogger().getEffectiveLevel(),
                True,  # the engine binds the input: every API process connects to it
                lifeline,
                placement,
            ),
            name=placement.title,
        )
        process.start()
        return process

    def _start_api(
        self, index: int, sockets: list[socket.socket], lifelines: list[Connection]
    ) -> BaseProcess:
        addresses = [
            (address, outputs[index])
            for address, outputs in zip(self.input_addresses, self.output_addresses, strict=True)
        ]
        process = self.spawn.Process(
            target=run_api_process,
            args=(
                self.args,
                sockets,
                addresses,
                index,
                lifelines,
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
        seen_dead: set[int] = set()  # engine cores
        failed = False
        while any(api.exitcode is None for api in self.apis):
            running = [api.sentinel for api in self.apis if api.exitcode is None]
            engines = [e.sentinel for i, e in enumerate(self.engines) if i not in seen_dead]
            wait([*running, *engines], timeout=1.0)
            for i, engine in enumerate(self.engines):
                if i not in seen_dead and engine.exitcode is not None:
                    seen_dead.add(i)
                    if not self.stopping:
                        logger.error("%s exited (code %s)", engine.name, engine.exitcode)
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
        """Tell every engine core to stop, then wait for each (killing one that does not)."""
        for engine, address in zip(self.engines, self.input_addresses, strict=True):
            if engine.exitcode is None:
                context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
                sock = context.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(address)
                sock.send(msgspec.msgpack.encode(Shutdown()))
                sock.close()
        for engine in self.engines:
            engine.join(ENGINE_STOP_TIMEOUT)
            if engine.exitcode is None:
                logger.warning("%s did not stop; killing it", engine.name)
                engine.kill()
                engine.join(5)


def run_api_process(
    args: argparse.Namespace,
    sockets: list[socket.socket],
    addresses: list[tuple[str, str]],
    index: int,
    lifelines: list[Connection],
    log_level: int,
) -> None:
    """One API process: a client of the shared engine core(s), serving HTTP on ``sockets``.
    ``addresses``: per core, its input address and this process's output address."""
    import setproctitle

    from hwlm.cli.serve import _serve, _SignalGuard
    from hwlm.engine.client_mp import MultiProcessEngineClient
    from hwlm.engine.dp_client import DataParallelEngineClient
    from hwlm.server.engine_seam_mp import ProcessEngineSeam

    setproctitle.setproctitle(f"hwlm::api{index}")
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s api{index} %(name)s: %(message)s"
    )
    guard = _SignalGuard()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, guard)
    client: MultiProcessEngineClient | DataParallelEngineClient
    try:
        if len(addresses) == 1:
            (input_address, output_address), (lifeline,) = addresses[0], lifelines
            client = MultiProcessEngineClient.connect(
                input_address, output_address, index, lifeline
            )
        else:
            client = DataParallelEngineClient.connect(addresses, index, lifelines)
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
