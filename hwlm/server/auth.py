"""API-key check, as a plain ASGI middleware: with a key configured, every route needs it but
the health checks (``/health``, ``/ping``), ``/version`` and, unless ``--metrics-require-key``,
``/metrics``.

It runs before FastAPI reads the body, so an unauthenticated request gets 401 whatever its body,
and routes that cost work (``/tokenize``, the docs and schema) cannot be used without the key.
The ``Bearer`` scheme is matched case-insensitively (RFC 7235). The key is compared as UTF-8
bytes with the header's raw bytes, in constant time, and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from hwlm.server.errors import APIError

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ping", "/version"})  # probes carry no key; nothing costly


class APIKeyMiddleware:
    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: Collection[str] = OPEN_PATHS
    ) -> None:
        self.app = app
        self._key = api_key.encode("utf-8", "surrogateescape")
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] not in self._open
            and scope["method"] != "OPTIONS"  # CORS preflights carry no credentials
        ):
            given = _bearer_credentials(_raw_header(scope, b"authorization"))
            if given is None or not hmac.compare_digest(given, self._key):
                logger.info("rejected a request to %s: missing or wrong API key", scope["path"])
                error = APIError(
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    401,
                    code="invalid_api_key",
                )
                response = error.response()
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _raw_header(scope: Scope, name: bytes) -> bytes:
    """The first ``name`` header's value as the client sent its bytes (b"" if none)."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return b""


def _bearer_credentials(header: bytes) -> bytes | None:
    """The credentials of an ``Authorization: Bearer <credentials>`` header, the scheme in any
    case; None for another scheme or none."""
    scheme, _, credentials = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return credentials.lstrip(b" ")
