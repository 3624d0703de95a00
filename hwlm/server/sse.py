"""Encoding responses: JSON bodies and server-sent events, with orjson.

A streamed response sends many chunks that differ only in their choice, so ``ChunkEncoder``
encodes the parts they share (``id``, ``object``, ``created``, ``model``) once, and each event
encodes just its choice. ``EventStreamResponse`` sends them: each item of its iterator (one or
more events) in one write, the last (the one ending with ``[DONE]``) together with the end of the
body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def json_response(body: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


SMALL_BODY_CHOICES = 4  # up to this many choices, a body is encoded whole (with a length)


def choices_response(head: dict[str, Any], choices: list[Any], tail: dict[str, Any]) -> Response:
    """The JSON object ``{**head, "choices": choices, **tail}``. Past a few choices it is sent
    as it is encoded, one choice at a time (chunked), each choice's bytes freed once written: a
    large body (n x logprobs x echo) is never held whole beside the objects it is made from."""
    if len(choices) <= SMALL_BODY_CHOICES:
        return json_response({**head, "choices": choices, **tail})
    return StreamingResponse(_choices_body(head, choices, tail), media_type="application/json")


async def _choices_body(
    head: dict[str, Any], choices: list[Any], tail: dict[str, Any]
) -> AsyncIterator[bytes]:
    yield orjson.dumps(head)[:-1] + b',"choices":['
    for i in range(len(choices)):
        choice, choices[i] = choices[i], None  # its objects go once it is encoded
        yield (b"," if i else b"") + orjson.dumps(choice)
        del choice
    rest = orjson.dumps(tail)
    yield b"]" + (b"," + rest[1:] if len(rest) > 2 else b"}")


class ChunkEncoder:
    """The events of one streamed response, in OpenAI's chunk format:
    ``{"id", "object", "created", "model", "choices": [...]}``, plus ``"usage": null`` on every
    chunk but the last when the client asked for usage (as OpenAI sends it)."""

    def __init__(
        self, request_id: str, object_name: str, created: int, model: str, include_usage: bool
    ) -> None:
        head = orjson.dumps(
            {"id": request_id, "object": object_name, "created": created, "model": model}
        )
        self._prefix = b"data: " + head[:-1] + b',"choices":['
        self._suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def choice(self, choice: dict[str, Any]) -> bytes:
        """A chunk carrying one choice."""
        return b"".join((self._prefix, orjson.dumps(choice), self._suffix))

    def usage(self, usage: dict[str, int]) -> bytes:
        """The last chunk: no choice, the usage."""
        return self._prefix + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response over ``events``, an async iterator of encoded events:
    each item goes out in one write as soon as it comes, and the item that ends with
    ``[DONE]`` ends the body in the same write (the iterator is then closed).

    As ``StreamingResponse``, the events are sent by a task of their own, which a client that
    disconnects cancels, and ``background`` runs afterwards; the disconnect is watched by a plain
    task rather than an anyio task group. (Sending from a task of its own also keeps each wake-up
    of the stream short: the request's task sits under every middleware's frame.)"""

    def __init__(
        self, events: AsyncIterator[bytes], background: BackgroundTask | None = None
    ) -> None:
        super().__init__(events, media_type="text/event-stream", background=background)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec_version = scope.get("asgi", {}).get("spec_version", "2.0")
        if tuple(map(int, spec_version.split("."))) >= (2, 4):
            try:
                await self.stream_response(send)  # send raises OSError once the client is gone
            except OSError:
                raise ClientDisconnect() from None
        else:
            await self._stream_until_disconnect(receive, send)
        if self.background is not None:
            await self.background()

    async def _stream_until_disconnect(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        streamer = loop.create_task(self.stream_response(send))
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            finally:  # the client has left (or receive failed): stop the stream
                if not streamer.done():
                    disconnected = True
                    streamer.cancel()

        watcher = loop.create_task(watch())
        try:
            await streamer
        except asyncio.CancelledError:
            # Swallowed only when the watcher cancelled the stream (the client has left), not
            # when this task was cancelled (Python 3.11 counts that: ``cancelling()``).
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)
            if not disconnected or (cancelling is not None and cancelling()):
                raise
        finally:
            if not streamer.done():
                streamer.cancel()
            watcher.cancel()
        error = watcher.exception() if watcher.done() and not watcher.cancelled() else None
        if error is not None:  # receive failed
            raise error

    async def stream_response(self, send: Send) -> None:
        events = self._events
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )  # fmt: skip
            async for chunk in events:
                last = chunk.endswith(SSE_DONE)
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
