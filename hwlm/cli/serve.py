"""``hwlm serve``: the argument parser and the server's main loop.

This module imports no web framework at import time (``hwlm.cli.main`` imports it for every command);
fastapi and uvicorn are imported inside ``run_serve``.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import signal
import socket
from types import FrameType
from typing import Any

from hwlm.engine.heap import freeze_startup_heap
from hwlm.engine_args import add_cli_args, from_cli_args
from hwlm.server.options import (
    add_chat_options,
    add_server_options,
    chat_settings,
    cors_settings,
    server_limits,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "hwlm-tiny"
API_KEY_ENV = "HWLM_API_KEY"


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve [MODEL]`` with ``vllm serve``'s flag names (the engine's from
    ``EngineArgs``), its ``func`` running the server."""
    serve: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API"
    )
    serve.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"folder, hub id or preset (default: {DEFAULT_MODEL}, a built-in model with dummy "
        "weights that needs no download)",
    )
    serve.add_argument("--host", default="localhost", help="address to bind (default: localhost)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health, /ping, "
        f"/version and /metrics (default: ${API_KEY_ENV})",
    )
    serve.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: MODEL)"
    )
    serve.add_argument(
        "--chat-template",
        default=None,
        help="Jinja chat template for /v1/chat/completions: a file, or the template itself "
        "(default: the tokenizer's)",
    )
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,
        help="hwlm's logging level (default: info)",
    )
    serve.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's logging level, access log included (default: info)",
    )
    add_server_options(serve)
    add_chat_options(serve)
    add_cli_args(serve)
    serve.add_argument(  # vLLM's short spelling of --data-parallel-size
        "-dp",
        dest="data_parallel_size",
        type=int,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    serve.set_defaults(func=run_serve)
    return serve


class _SignalGuard:
    """SIGINT/SIGTERM handler outside uvicorn's own: while the model loads a signal interrupts
    the load (KeyboardInterrupt); once serving, it asks the server to exit. uvicorn re-raises the
    signals it caught after its graceful shutdown; they land here and are absorbed."""

    def __init__(self) -> None:
        self.server: Any = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.server is None:
            raise KeyboardInterrupt
        self.server.handle_exit(signum, frame)


def run_serve(args: argparse.Namespace) -> int:
    """Claim the address, build the engine and the app, serve until SIGINT/SIGTERM, shut down;
    0 on a clean exit. An address that cannot be bound is a ValueError, before any model
    loads."""
    _check_data_parallel(args)
    sockets = bind_sockets(args.host, args.port)
    if getattr(args, "api_server_count", 1) > 1:
        from hwlm.cli.serve_api_processes import serve_with_api_processes

        try:
            return serve_with_api_processes(args, sockets)
        finally:
            for sock in sockets:
                sock.close()
    guard = _SignalGuard()
    previous = {sig: signal.signal(sig, guard) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(args, sockets, guard)
    except KeyboardInterrupt:
        logger.info("interrupted before the server started")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()


def _check_data_parallel(args: argparse.Namespace) -> None:
    """ValueError (one line) for a --data-parallel-size the server cannot run."""
    size = getattr(args, "data_parallel_size", 1)
    if size < 1:
        raise ValueError(f"--data-parallel-size must be at least 1, got {size}")
    if size > 1 and not getattr(args, "engine_process", True):
        raise ValueError("--data-parallel-size above 1 needs the engine in its own process")


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind (not yet listen on) every address ``host`` resolves to, as asyncio's create_server
    (which uvicorn uses) would; a family the machine lacks is skipped. Raises ValueError naming
    ``host:port`` when the address is in use or cannot be bound."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {where}: {exc.strerror}") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = _bound_socket(family, kind, proto, address)
            if sock is not None:
                sockets.append(sock)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ValueError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    if not sockets:
        raise ValueError(f"cannot listen on {where}: no usable address")
    return sockets


def _bound_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, proto: int, address: Any
) -> socket.socket | None:
    """A socket bound to ``address``; None when the machine lacks its address family."""
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            return None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:  # e.g. IPv6 turned off
            return None
        raise
    return sock


def _serve(
    args: argparse.Namespace,
    sockets: list[socket.socket],
    guard: _SignalGuard,
    engine_and_seam: tuple[Any, Any] | None = None,
) -> int:
    """Serve on ``sockets`` until a signal; the engine is built here unless given (an API
    process of several is given its client of the shared engine core)."""
    import uvicorn

    from hwlm.server.api import build_app
    from hwlm.server.chat_template import load_chat_template
    from hwlm.server.connections import guarded_protocol
    from hwlm.server.log_redaction import install_redaction

    chat_template = load_chat_template(args.chat_template)
    chat = chat_settings(args, chat_template)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    served_model_name = args.served_model_name or args.model
    engine, seam = engine_and_seam if engine_and_seam is not None else _build_engine(args)
    try:
        app = build_app(
            seam,
            served_model_name,
            api_key,
            server_limits(args),
            cors_settings(args),
            chat_template=chat_template,
            chat=chat,
        )
        loop, http = event_loop_and_http_parser()
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            loop=loop,
            http=guarded_protocol(http, args.header_timeout, args.max_connections or None),
            log_level=args.uvicorn_log_level,
            timeout_graceful_shutdown=max(1, round(args.shutdown_timeout)),
            timeout_keep_alive=max(1, round(args.keep_alive_timeout)),
        )
        install_redaction([api_key] if api_key else [])  # uvicorn.Config set up logging
        server = _make_server(uvicorn, config, engine, app)
        guard.server = server
        freeze_startup_heap()
        logger.info(
            "serving %r as %r on http://%s:%d%s",
            args.model,
            served_model_name,
            args.host,
            sockets[0].getsockname()[1],  # the port bound, should --port be 0
            " (API key required)" if api_key else "",
        )
        try:
            server.run(sockets=sockets)
        except SystemExit as exc:  # uvicorn exits this way when it cannot bind
            return exc.code if isinstance(exc.code, int) else 1
        return 0 if server.started else 1
    finally:
        engine.shutdown()
        logger.info("server stopped")


def _build_engine(args: argparse.Namespace) -> tuple[Any, Any]:
    """The engine (what ``shutdown`` stops) and what ``build_app`` takes: an ``AsyncLLMEngine``
    (the engine on a thread) for both, or with ``--engine-process`` a
    ``MultiProcessEngineClient`` and a ``ProcessEngineSeam`` over it."""
    if not getattr(args, "engine_process", False):
        from hwlm.engine.llm_engine import LLMEngine
        from hwlm.server.async_engine import AsyncLLMEngine

        engine = AsyncLLMEngine(LLMEngine(from_cli_args(args)))
        return engine, engine
    from hwlm.engine.client_mp import MultiProcessEngineClient
    from hwlm.engine.dp_client import DataParallelEngineClient
    from hwlm.server.engine_seam_mp import ProcessEngineSeam

    size = getattr(args, "data_parallel_size", 1)
    client: MultiProcessEngineClient | DataParallelEngineClient
    if size > 1:
        client = DataParallelEngineClient.start(from_cli_args(args), size)
        logger.info("%d engine cores run in processes %s (hwlm::engine<i>)", size, client.pids)
    else:
        client = MultiProcessEngineClient(from_cli_args(args))
        logger.info("the engine core runs in process %d (hwlm::engine)", client.pid)
    try:
        return client, ProcessEngineSeam(client)
    except BaseException:
        client.shutdown()
        raise


def event_loop_and_http_parser() -> tuple[str, str]:
    """uvicorn's fastest event loop and HTTP parser of those installed (the server extra brings
    uvloop and httptools; without them asyncio's loop and h11)."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    logger.info("uvicorn: %s event loop, %s HTTP parser", loop, http)
    return loop, http


def _make_server(uvicorn: Any, config: Any, engine: Any, app: Any) -> Any:
    """A uvicorn.Server that drains on SIGINT/SIGTERM: it stops listening and answers new
    requests on open connections with 503, while in-flight requests run on for up to
    --shutdown-timeout seconds (then uvicorn cancels them, which aborts them). A second signal
    stops the engine at once: in-flight responses end with an error."""

    class Server(uvicorn.Server):  # type: ignore[misc]
        finished = False

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            self.finished = True  # uvicorn re-raises the signals it caught after this

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.finished:
                return
            if self.should_exit:
                logger.info("second signal: aborting in-flight requests")
                engine.shutdown(timeout=0)
            else:
                logger.info("shutting down: draining in-flight requests")
            app.state.draining = True
            super().handle_exit(sig, frame)

    return Server(config)
