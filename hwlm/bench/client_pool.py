"""Client processes for ``hwlm bench serve --client-processes N``.

Reading hundreds of event streams costs a Python process more than a fast server takes to send
them, so the streams are spread over N forked processes, each with its own event loop and aiohttp
session. The parent keeps the schedule (``hwlm.bench.dispatch``) and hands each request, when it
may start, to the process with the fewest in flight; the process sends back its RequestResult.
Times are ``time.perf_counter()`` values, one clock for all processes of a machine.

Parent and process talk over a socket pair in length-prefixed pickles: to the process
``("open", ClientSettings)``, ``("run", BenchRequest, sent_at)``, ``("close",)`` (when its
requests are done) and None (exit); back ``"ready"``, RequestResults and ``"closed"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import socket
from collections.abc import AsyncIterator
from typing import Any

from hwlm.bench.aio import run_async
from hwlm.bench.client import ClientSettings, RequestResult, open_client
from hwlm.bench.datasets import BenchRequest

READY, CLOSED = "ready", "closed"


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "little") + data


class Channel:
    """Messages over a stream socket, on the running event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        return cls(*await asyncio.open_connection(sock=sock))

    def send(self, message: Any) -> None:
        self.writer.write(_frame(message))

    async def recv(self) -> Any:
        size = int.from_bytes(await self.reader.readexactly(4), "little")
        return pickle.loads(await self.reader.readexactly(size))

    def close(self) -> None:
        self.writer.close()


class ClientPool:
    """N client processes. ``start`` forks them: call it before this process starts threads or
    network clients. Then ``async with pool.running(settings)`` around each run, and ``close``."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"--client-processes must be at least 1, got {processes}")
        self.processes = processes
        self.socks: list[socket.socket] = []
        self.procs: list[Any] = []
        self.channels: list[Channel] = []
        self.in_flight = [0] * processes
        self.pending: list[dict[int, asyncio.Future[RequestResult]]] = []

    def start(self) -> ClientPool:
        context = multiprocessing.get_context("fork")
        for _ in range(self.processes):
            mine, theirs = socket.socketpair()
            proc = context.Process(target=_worker_main, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.socks.append(mine)
            self.procs.append(proc)
        return self

    @contextlib.asynccontextmanager
    async def running(self, settings: ClientSettings) -> AsyncIterator[ClientPool]:
        """Every process with a session for ``settings``; results are read as they come."""
        # Duplicates, so that closing this loop's channels leaves the sockets open.
        self.channels = [await Channel.open(sock.dup()) for sock in self.socks]
        self.in_flight = [0] * self.processes
        self.pending = [{} for _ in range(self.processes)]
        readers: list[asyncio.Task[None]] = []
        try:
            for channel in self.channels:
                channel.send(("open", settings))
            replies = [await _reply(channel) for channel in self.channels]
            failed = [reply for reply in replies if reply != READY]
            if failed:
                raise ValueError(f"a client process failed: {failed[0]}")
            readers = [asyncio.create_task(self._read(k)) for k in range(self.processes)]
            yield self
        finally:
            for channel in self.channels:
                channel.send(("close",))
            await asyncio.gather(*readers)
            for channel in self.channels:
                channel.close()
            self.channels = []

    async def submit(self, request: BenchRequest, sent_at: float) -> RequestResult:
        """Run ``request`` in the process with the fewest requests in flight."""
        k = min(range(self.processes), key=self.in_flight.__getitem__)
        future: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
        self.pending[k][request.index] = future
        self.in_flight[k] += 1
        self.channels[k].send(("run", request, sent_at))
        return await future

    async def _read(self, k: int) -> None:
        """Resolve process k's results until it has closed its session (or exited)."""
        while True:
            message = await _reply(self.channels[k])
            if isinstance(message, RequestResult):
                self.in_flight[k] -= 1
                self.pending[k].pop(message.index).set_result(message)
                continue
            for index, future in self.pending[k].items():
                future.set_result(RequestResult(index, error=f"client process {k}: {message}"))
            self.pending[k].clear()
            self.in_flight[k] = 1 << 30  # never chosen again
            return

    def close(self) -> None:
        """Stop the processes."""
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.setblocking(True)
                sock.sendall(_frame(None))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        for sock in self.socks:
            sock.close()
        self.socks, self.procs = [], []


async def _reply(channel: Channel) -> Any:
    try:
        return await channel.recv()
    except (asyncio.IncompleteReadError, ConnectionError):
        return "the process exited"


def _worker_main(sock: socket.socket) -> None:
    try:
        run_async(_worker(sock))
    except KeyboardInterrupt:
        pass
    finally:
        os._exit(0)  # not the parent's atexit handlers, inherited by fork


async def _worker(sock: socket.socket) -> None:
    channel = await Channel.open(sock)
    while True:
        message = await _reply(channel)
        if not isinstance(message, tuple):  # None: exit (a string: the parent is gone)
            return
        if message[0] == "open" and await _session(channel, message[1]):
            return


async def _session(channel: Channel, settings: ClientSettings) -> bool:
    """Serve one run; True when the parent asked this process to exit."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(open_client(settings))
        except Exception as exc:  # e.g. no aiohttp: the parent reports it
            channel.send(f"{type(exc).__name__}: {exc}")
            return False
        channel.send(READY)
        tasks: set[asyncio.Task[None]] = set()

        async def run_one(request: BenchRequest, sent_at: float) -> None:
            channel.send(await client.run(request, sent_at))

        while True:
            message = await _reply(channel)
            if not isinstance(message, tuple) or message[0] != "run":
                break
            task = asyncio.create_task(run_one(*message[1:]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    if isinstance(message, tuple):
        channel.send(CLOSED)
        await channel.writer.drain()
        return False
    return True
