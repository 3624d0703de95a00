"""``hwlm serve``: the argument parser and the server's main loop.

This module imports no web framework at import time (``hwlm.cli.main`` imports it for every command);
fastapi and uvicorn are imported inside ``run_serve``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from hwlm.server.options import add_server_options, cors_settings, server_limits

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "hwlm-tiny"
API_KEY_ENV = "HWLM_API_KEY"


def add_serve_parser(
    subparsers: Any,
    add_engine_arguments: Callable[[argparse.ArgumentParser], None],
    engine_kwargs: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
) -> argparse.ArgumentParser:
    """Register ``serve [MODEL]`` with ``vllm serve``'s flag names; with ``engine_kwargs`` (the
    namespace -> engine keyword arguments function) it also sets the command's ``func``."""
    serve = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
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
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})",
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
    add_engine_arguments(serve)
    if engine_kwargs is not None:
        serve.set_defaults(func=lambda args: run_serve(args, engine_kwargs(args)))
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


def run_serve(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    """Build the engine and the app, serve until SIGINT/SIGTERM, shut down; 0 on a clean exit."""
    guard = _SignalGuard()
    previous = {sig: signal.signal(sig, guard) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(args, engine_kwargs, guard)
    except KeyboardInterrupt:
        logger.info("interrupted before the server started")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args: argparse.Namespace, engine_kwargs: dict[str, Any], guard: _SignalGuard) -> int:
    import uvicorn

    from hwlm.engine.llm_engine import EngineArgs, LLMEngine
    from hwlm.server.api import build_app
    from hwlm.server.async_engine import AsyncLLMEngine
    from hwlm.server.chat_template import load_chat_template

    chat_template = load_chat_template(args.chat_template)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    served_model_name = args.served_model_name or args.model
    engine = AsyncLLMEngine(LLMEngine(EngineArgs(model=args.model, **engine_kwargs)))
    try:
        app = build_app(
            engine,
            served_model_name,
            api_key,
            server_limits(args),
            cors_settings(args),
            chat_template=chat_template,
        )
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            timeout_graceful_shutdown=max(1, round(args.shutdown_timeout)),
        )
        server = _make_server(uvicorn, config, engine, app)
        guard.server = server
        logger.info(
            "serving %r as %r on http://%s:%d%s",
            args.model,
            served_model_name,
            args.host,
            args.port,
            " (API key required on /v1)" if api_key else "",
        )
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits this way when it cannot bind
            return exc.code if isinstance(exc.code, int) else 1
        return 0 if server.started else 1
    finally:
        engine.shutdown()
        logger.info("server stopped")


def _make_server(uvicorn: Any, config: Any, engine: Any, app: Any) -> Any:
    """A uvicorn.Server that drains on SIGINT/SIGTERM: it stops listening and answers new
    requests on open connections with 503, while in-flight requests run on for up to
    --shutdown-timeout seconds (then uvicorn cancels them, which aborts them). A second signal
    stops the engine at once: in-flight responses end with an error."""

    class Server(uvicorn.Server):  # type: ignore[misc, name-defined]
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
