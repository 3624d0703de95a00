"""Connection limits below the ASGI app, in uvicorn's HTTP protocol: a deadline for a request's
headers and a bound on open connections.

uvicorn times out idle keep-alive connections only until their first byte, and not at all a new
connection that sends nothing; a client that trickles its headers would hold a connection
forever. ``guarded_protocol`` returns uvicorn's protocol class (httptools or h11) with:

* a header deadline, armed when a connection opens and after each response, cleared once a
  request's headers are complete: past it the connection is closed;
* a bound on open connections: one over it is answered 503 and closed at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)

_BUSY_BODY = (
    b'{"error":{"message":"the server has too many open connections; retry later",'
    b'"type":"server_error","param":null,"code":"server_overloaded"}}'
)
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


def guarded_protocol(http: str, header_timeout_s: float, max_connections: int | None) -> type:
    """uvicorn's ``http`` protocol class ("httptools" or "h11") with the header deadline and the
    connection bound (None: no bound)."""
    base: Any
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol

    class GuardedProtocol(base):  # type: ignore[misc]
        _deadline: asyncio.TimerHandle | None = None
        _seen_cycle: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if max_connections is not None and len(self.connections) > max_connections:
                logger.warning("refused a connection: %d are open", len(self.connections) - 1)
                transport.write(BUSY_RESPONSE)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._seen_cycle:
                self._seen_cycle = self.cycle  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            idle = self.cycle is None or self.cycle.response_complete  # none pipelined
            if idle and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._on_deadline)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _on_deadline(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                logger.info(
                    "closed a connection: no complete request headers in %g s", header_timeout_s
                )
                self.transport.close()

    return GuardedProtocol
