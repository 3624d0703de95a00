"""``hwlm serve`` flags for limits, overload, CORS and shutdown, and the settings they build.

Imports no web framework (``hwlm.cli.main`` imports this for every command).
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0  # under Kubernetes' default 30 s termination grace period


def add_server_options(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("request limits and overload")
    limits.add_argument(
        "--max-request-bytes",
        type=int,
        default=8 * 2**20,
        help="largest request body accepted; larger bodies get 413 (default: 8 MiB)",
    )
    limits.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens / max_completion_tokens a request may ask for (default: only "
        "max_model_len bounds it)",
    )
    limits.add_argument("--max-n", type=int, default=16, help="largest n (default: 16)")
    limits.add_argument(
        "--max-stop-strings", type=int, default=16, help="most stop strings per request (16)"
    )
    limits.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="sequences (prompts x max(n, best_of)) allowed to wait for the scheduler (per "
        "engine core, with --data-parallel-size); beyond it new requests get 503 with "
        "Retry-After (0: no limit; default: 1024)",
    )
    limits.add_argument(
        "--max-logprob-entries",
        type=int,
        default=2**18,
        help="most logprob entries one response may carry (choices x tokens x (top logprobs "
        "+ 1), echoed and prompt tokens included); more get 400 (0: no limit; default: "
        "%(default)s)",
    )
    conns = parser.add_argument_group("connections")
    conns.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        help="seconds a connection may take to send a request's headers (after opening, or "
        "after the last response); then it is closed (default: %(default)s)",
    )
    conns.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        help="seconds a request may take to send its whole body; then 408 (default: %(default)s)",
    )
    conns.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (default: %(default)s)",
    )
    conns.add_argument(
        "--max-connections",
        type=int,
        default=2048,
        help="open connections allowed; one more is answered 503 and closed (0: no limit; "
        "default: %(default)s)",
    )
    conns.add_argument(
        "--metrics-require-key",
        action="store_true",
        help="with an API key, /metrics needs it too (default: /metrics is open, as /health)",
    )
    cors = parser.add_argument_group("CORS (off unless --allowed-origins is given)")
    cors.add_argument(
        "--allowed-origins", nargs="*", default=[], metavar="ORIGIN", help="origins allowed"
    )
    cors.add_argument(
        "--allowed-methods", nargs="*", default=["*"], metavar="METHOD", help="(default: *)"
    )
    cors.add_argument(
        "--allowed-headers", nargs="*", default=["*"], metavar="HEADER", help="(default: *)"
    )
    cors.add_argument(
        "--allow-credentials", action="store_true", help="allow cookies and auth headers"
    )
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine core in its own process (titled hwlm::engine), tokenization, "
        "detokenization and SSE staying in the server's; --no-engine-process runs the engine "
        "on a thread of the server process (default: on)",
    )
    parser.add_argument(
        "--api-server-count",
        type=_positive_int,
        default=1,
        metavar="N",
        help="API server processes sharing the port, all served by one engine core process "
        "(needs the engine process) (default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish before they are "
        "aborted; new requests are refused meanwhile (default: %(default)s)",
    )


def add_chat_options(parser: argparse.ArgumentParser) -> None:
    """vLLM's tool-calling and reasoning flags."""
    from hwlm.server.reasoning.registry import reasoning_parser_names
    from hwlm.server.tools.registry import tool_parser_names

    chat = parser.add_argument_group("tool calling and reasoning (/v1/chat/completions)")
    chat.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide to call tools (tool_choice "auto", the default with tools); '
        "needs --tool-call-parser",
    )
    chat.add_argument(
        "--tool-call-parser",
        choices=tool_parser_names(),
        default=None,
        help="the format the model writes tool calls in (hermes: Hermes, Qwen2.5, Qwen3; "
        "llama3_json: Llama 3.1/3.2; mistral)",
    )
    chat.add_argument(
        "--reasoning-parser",
        choices=reasoning_parser_names(),
        default=None,
        help="return the model's <think> reasoning as reasoning_content (qwen3, deepseek_r1)",
    )


def chat_settings(args: argparse.Namespace, chat_template: str | None) -> Any:
    """The chat options of the flags; ValueError for --enable-auto-tool-choice without a
    parser."""
    from hwlm.server.chat import ChatSettings
    from hwlm.server.reasoning.registry import get_reasoning_format
    from hwlm.server.tools.choice import ToolSettings
    from hwlm.server.tools.registry import get_tool_format

    auto = getattr(args, "enable_auto_tool_choice", False)
    parser = getattr(args, "tool_call_parser", None)
    if auto and parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    tools = ToolSettings(auto, get_tool_format(parser) if parser else None)
    reasoning_name = getattr(args, "reasoning_parser", None)
    reasoning = get_reasoning_format(reasoning_name) if reasoning_name else None
    return ChatSettings(chat_template, tools, reasoning)


def server_limits(args: argparse.Namespace) -> Any:
    from hwlm.server.admission import ServerLimits

    return ServerLimits(
        max_request_bytes=args.max_request_bytes,
        max_tokens=args.max_tokens_limit,
        max_n=args.max_n,
        max_stop_strings=args.max_stop_strings,
        max_waiting_requests=args.max_waiting_requests or None,
        max_logprob_entries=args.max_logprob_entries or None,
        body_timeout_s=args.body_timeout,
        metrics_require_key=args.metrics_require_key,
        engine_cores=getattr(args, "data_parallel_size", 1),
    )


def cors_settings(args: argparse.Namespace) -> Any:
    from hwlm.server.cors import CORSSettings

    return CORSSettings(
        allowed_origins=list(args.allowed_origins),
        allowed_methods=list(args.allowed_methods),
        allowed_headers=list(args.allowed_headers),
        allow_credentials=args.allow_credentials,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
