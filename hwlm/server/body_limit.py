"""A request-body size limit, as a plain ASGI middleware: 413 with an OpenAI error body.

A declared ``Content-Length`` over the limit is refused before any of the body is read; a body
sent without one (chunked) is counted as it arrives and refused once it passes the limit, so the
server never buffers more than ``max_bytes`` of one request.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hwlm.server.errors import APIError


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large().response()(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _too_large(self) -> APIError:
        return APIError(f"the request body exceeds the limit of {self.max_bytes} bytes", 413)

    def _counting(self, receive: Receive) -> Receive:
        """``receive`` that raises HTTPException(413) once the body passes the limit; FastAPI
        passes HTTPExceptions raised while reading the body on to the error handlers."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large().message)
            return message

        return limited
