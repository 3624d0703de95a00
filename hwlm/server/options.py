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
        help="requests allowed to wait for the scheduler; beyond it new ones get 503 with "
        "Retry-After (0: no limit; default: 1024)",
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


def server_limits(args: argparse.Namespace) -> Any:
    from hwlm.server.admission import ServerLimits

    return ServerLimits(
        max_request_bytes=args.max_request_bytes,
        max_tokens=args.max_tokens_limit,
        max_n=args.max_n,
        max_stop_strings=args.max_stop_strings,
        max_waiting_requests=args.max_waiting_requests or None,
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
