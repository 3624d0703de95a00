"""A stand-in OpenAI server that costs almost nothing per token, to measure the load generator.

It answers POST /v1/completions and /v1/chat/completions with ``max_tokens`` (or
``max_completion_tokens``) tokens of pre-encoded server-sent events shaped like hwlm's (each
token its own event and write, then the usage event and ``[DONE]``), and GET /v1/models and
/health, from several processes sharing one port (SO_REUSEPORT, else one inherited listening
socket). Whatever ``hwlm bench serve`` reads from it is the generator's ceiling: a real server's
figure near it measures the client, not the server.

    python -m hwlm.bench.standin --port 8000 --processes 12      # or: hwlm bench standin ...
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, cast

from hwlm.bench.aio import run_async
from hwlm.bench.client import dumps, loads

logger = logging.getLogger(__name__)

STANDIN_MODEL = "standin"
# Token texts cycled through: 1-8 bytes, like a real tokenizer's pieces.
TOKEN_TEXTS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


@dataclass(frozen=True)
class StandinSettings:
    model: str = STANDIN_MODEL
    token_interval_s: float = 0.0  # pause between a stream's tokens (0: just yield)


def _frame(payload: dict[str, Any] | None) -> bytes:
    """One event (``[DONE]`` for None) as one chunk of a chunked HTTP body."""
    data = b"data: " + (b"[DONE]" if payload is None else dumps(payload)) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Events:
    """The pre-encoded events of one endpoint's streams."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.head = {
            "id": "chatcmpl-standin" if chat else "cmpl-standin",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 0,
            "model": model,
        }
        self.tokens = [self._token(text, None) for text in TOKEN_TEXTS]
        self.last = [self._token(text, "length") for text in TOKEN_TEXTS]
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        self.first = [_frame(dict(self.head, choices=[role]))] if chat else []
        self.done = _frame(None)

    def _token(self, text: str, finish: str | None) -> bytes:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice.update(finish_reason=finish, stop_reason=None)
        return _frame(dict(self.head, choices=[choice]))

    def stream(self, num_tokens: int, prompt_tokens: int) -> list[bytes]:
        k = len(self.tokens)
        frames = [*self.first, *(self.tokens[i % k] for i in range(num_tokens - 1))]
        frames.append(self.last[(num_tokens - 1) % k])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": num_tokens,
            "total_tokens": prompt_tokens + num_tokens,
        }
        frames += [_frame(dict(self.head, choices=[], usage=usage)), self.done]
        return frames

    def whole(self, num_tokens: int, prompt_tokens: int) -> dict[str, Any]:
        text = "".join(TOKEN_TEXTS[i % len(TOKEN_TEXTS)] for i in range(num_tokens))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": num_tokens}
        usage["total_tokens"] = prompt_tokens + num_tokens
        obj = "chat.completion" if self.chat else "text_completion"
        return dict(self.head, object=obj, choices=[choice], usage=usage)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; requests are answered one after another."""

    def __init__(self, settings: StandinSettings, events: dict[str, _Events]) -> None:
        self.settings = settings
        self.events = events
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.paused: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake()

    def _wake(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.paused = None

    def _next(self) -> None:
        request = _parse(self.buffer)
        if request is None:
            return
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._respond(*request))
        task.add_done_callback(self._responded)

    def _responded(self, task: asyncio.Task[None]) -> None:
        self.busy = False
        if task.exception() is not None and self.transport is not None:
            self.transport.close()
        elif not self.closed and self.buffer:
            self._next()

    async def _respond(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        chat = path == "/v1/chat/completions"
        if method == "POST" and (chat or path == "/v1/completions"):
            await self._generate(loads(body or b"{}"), self.events["chat" if chat else "text"])
        elif method == "GET" and path == "/v1/models":
            model = {"id": self.settings.model, "object": "model", "owned_by": "hwlm"}
            self._json(200, {"object": "list", "data": [model]})
        elif method == "GET" and path == "/health":
            self._json(200, None)
        else:
            self._json(404, {"error": {"message": f"no route {method} {path}", "code": 404}})

    async def _generate(self, body: dict[str, Any], events: _Events) -> None:
        num_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        prompt_tokens = _prompt_tokens(body)
        if not body.get("stream"):
            self._json(200, events.whole(num_tokens, prompt_tokens))
            return
        assert self.transport is not None
        self.transport.write(STREAM_HEAD)
        interval = self.settings.token_interval_s
        for frame in events.stream(num_tokens, prompt_tokens):
            if self.closed:
                return
            self.transport.write(frame)
            if self.paused is not None:
                await self.paused
            await asyncio.sleep(interval)
        self.transport.write(LAST_CHUNK)

    def _json(self, status: int, payload: Any) -> None:
        assert self.transport is not None
        data = b"" if payload is None else dumps(payload)
        reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
        head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        head += f"content-length: {len(data)}\r\n\r\n"
        self.transport.write(head.encode() + data)


def _parse(buffer: bytearray) -> tuple[str, str, bytes] | None:
    """The first complete request in ``buffer`` (removed from it), or None while incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    method, path = lines[0].split(" ")[:2]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    total = end + 4 + length
    if len(buffer) < total:
        return None
    body = bytes(buffer[end + 4 : total])
    del buffer[:total]
    return method, path.split("?")[0], body


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Token ids count as themselves, text as one token a word (the stand-in has no tokenizer)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    texts = [prompt] if isinstance(prompt, str) else []
    texts += [str(m.get("content") or "") for m in body.get("messages") or []]
    return sum(len(t.split()) for t in texts)


class StandinServer:
    """The stand-in in ``processes`` forked processes; a context manager giving its base URL."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        processes: int = 1,
        settings: StandinSettings | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"the stand-in needs at least one process, got {processes}")
        self.host, self.port, self.processes = host, port, processes
        self.settings = settings or StandinSettings()
        self.procs: list[Any] = []
        self.socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        shared = not hasattr(socket, "SO_REUSEPORT")
        if not shared:  # a port shared with another SO_REUSEPORT listener would split the load
            probe = _bind(self.host, self.port, reuse_port=False)
            self.port = probe.getsockname()[1]
            probe.close()
        self.socket = _bind(self.host, self.port, reuse_port=not shared)
        self.port = self.socket.getsockname()[1]
        if shared:
            self.socket.listen(4096)
        context = multiprocessing.get_context("fork")
        conns = []
        for _ in range(self.processes):
            parent, child = context.Pipe()
            listener = self.socket if shared else None
            args = (child, self.host, self.port, listener, self.settings)
            proc = context.Process(target=_worker_main, args=args, daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            conns.append(parent)
        try:
            for conn in conns:
                if not conn.poll(60):
                    raise ValueError("the stand-in server did not start within 60 s")
                reply = conn.recv()
                if reply != "ready":
                    raise ValueError(f"the stand-in server failed to start: {reply}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        logger.info("stand-in server on %s, %d process(es)", self.url, self.processes)
        return self.url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self.procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            proc.join(timeout=10)
        self.procs = []
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"the stand-in server cannot listen on {host}:{port}: {exc}") from exc
    return sock


def _worker_main(
    conn: Connection,
    host: str,
    port: int,
    listener: socket.socket | None,
    settings: StandinSettings,
) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        run_async(_serve(conn, host, port, listener, settings))
    finally:
        os._exit(0)


async def _serve(
    conn: Connection,
    host: str,
    port: int,
    listener: socket.socket | None,
    settings: StandinSettings,
) -> None:
    try:
        sock = listener or _bind(host, port, reuse_port=True)
        if listener is None:
            sock.listen(4096)
        events = {"text": _Events(settings.model, False), "chat": _Events(settings.model, True)}
        server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(settings, events), sock=sock
        )
    except Exception as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    conn.send("ready")
    async with server:
        await server.serve_forever()


# Command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument(
        "--processes",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="server processes sharing the port (default: half the CPUs, %(default)s)",
    )
    parser.add_argument("--served-model-name", default=STANDIN_MODEL, help="(default: %(default)s)")
    parser.add_argument(
        "--token-interval-ms",
        type=float,
        default=0.0,
        help="pause between a stream's tokens (default: 0, as fast as the client reads)",
    )


def run(args: argparse.Namespace) -> int:
    if args.token_interval_ms < 0:
        raise ValueError(f"--token-interval-ms must be >= 0, got {args.token_interval_ms}")
    settings = StandinSettings(args.served_model_name, args.token_interval_ms / 1000)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so that the processes are stopped too
    with StandinServer(args.host, args.port, args.processes, settings) as url:
        print(f"stand-in OpenAI server on {url}, {args.processes} process(es); Ctrl-C stops it")
        try:
            while True:
                signal.pause()
        except (KeyboardInterrupt, SystemExit):
            pass
    return 0


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hwlm.bench.standin", description=__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as exc:
        print(f"standin: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
