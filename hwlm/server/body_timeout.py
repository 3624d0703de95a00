"""A deadline for reading a request's body, as a plain ASGI middleware: a client that trickles its
body holds a connection and a handler; past ``timeout_s`` from the first read it gets 408 and
the connection is closed.

Only reading the body is timed: once its last part has come, ``receive`` (which a handler also
awaits to notice a disconnect) passes through untouched.
"""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTimeoutMiddleware:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, self._timed(receive), send)

    def _timed(self, receive: Receive) -> Receive:
        """``receive`` that raises HTTPException(408) when the body is not complete by the
        deadline; FastAPI passes HTTPExceptions raised while reading the body on to the error
        handlers."""
        deadline: float | None = None
        complete = False

        async def timed() -> Message:
            nonlocal deadline, complete
            if complete:
                return await receive()
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - now))
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        return timed
