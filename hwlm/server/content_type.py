"""JSON routes take JSON: a POST whose ``Content-Type`` is missing or not JSON gets a clear 415
before its body is read (rather than a puzzling "Input should be a valid dictionary")."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from hwlm.server.errors import APIError, quote


class JSONContentTypeMiddleware:
    """Checks every POST but those to ``exempt`` paths (which take no body)."""

    def __init__(self, app: ASGIApp, exempt: frozenset[str] = frozenset({"/ping"})) -> None:
        self.app = app
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] not in self.exempt
        ):
            given = _content_type(scope)
            if not is_json(given):
                got = quote(given.decode("latin-1")) if given else "none"
                error = APIError(
                    f"the body must be JSON, sent with 'Content-Type: application/json' "
                    f"(got {got})",
                    415,
                    code="unsupported_media_type",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_json(content_type: bytes) -> bool:
    """``application/json`` or ``application/<anything>+json``, with any parameters."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def _content_type(scope: Scope) -> bytes:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-type":
            return bytes(value)
    return b""
