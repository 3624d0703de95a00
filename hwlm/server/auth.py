"""API-key check for the /v1 routes, as a plain ASGI middleware.

It runs before FastAPI reads the body, so an unauthenticated request gets 401 whatever its body.
The ``Bearer`` scheme is matched case-insensitively (RFC 7235); the key is compared in constant
time and never logged.
"""

from __future__ import annotations

import hmac
import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from hwlm.server.errors import APIError

logger = logging.getLogger(__name__)


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8", "surrogateescape")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and _is_protected(scope["path"])
            and scope["method"] != "OPTIONS"
        ):
            given = _bearer_credentials(Headers(scope=scope).get("authorization", ""))
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


def _bearer_credentials(header: str) -> bytes | None:
    """The credentials of an ``Authorization: Bearer <credentials>`` header, the scheme in any
    case; None for another scheme or none."""
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.lstrip(" ").encode("utf-8", "surrogateescape")


def _is_protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")
