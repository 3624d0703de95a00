"""Encoding responses: JSON bodies and server-sent events, with orjson.

A streamed response sends many chunks that differ only in their choice, so ``ChunkEncoder``
encodes the parts they share (``id``, ``object``, ``created``, ``model``) once, and each event
encodes just its choice.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def json_response(body: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


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
        return self._prefix + orjson.dumps(choice) + self._suffix

    def usage(self, usage: dict[str, int]) -> bytes:
        """The last chunk: no choice, the usage."""
        return self._prefix + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"
