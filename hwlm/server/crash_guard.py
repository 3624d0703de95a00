"""The last resort for a bug: an exception no handler answered ends its request with a 500
OpenAI error body and ``Connection: close``, so the client reads a proper error and then opens a
new connection, instead of finding its keep-alive connection reset.

Starlette's own last-resort handler sends its response and then re-raises, which makes uvicorn
drop the connection without telling the client; this middleware sits inside it and does not
re-raise. A response already under way cannot be replaced: the exception is re-raised and uvicorn
cuts the connection (the client sees an incomplete response, as it must).
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hwlm.server.errors import APIError

logger = logging.getLogger(__name__)


class InternalErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            logger.exception("unexpected error serving %s %s", scope["method"], scope["path"])
            if started:
                raise
            response = APIError("internal server error", 500).response()
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
