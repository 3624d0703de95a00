"""The one path of a generation request through the server, for every API:

parse (FastAPI, into ``hwlm.server.protocol``'s models) -> admit (limits, queue room) -> plan
(the endpoint's shape: checks, prompts, parameters) -> submit (``Seam``: one engine request
per prompt) -> choices (``OutputFanIn`` merges the requests' outputs, read as ``ChoiceFeed``s that
give what each choice has new) -> encode (the shape lays out each choice, ``hwlm.server.sse``
encodes it and sends it).

A stream reads the engine's outputs only when it is ready to send: whatever piled up meanwhile
goes out as one event. The events made from one read go out in one write, and the last ones
(usage, ``[DONE]``) with the end of the body. Leaving early -- a client that disconnects,
mid-stream or while waiting for a non-streamed answer -- aborts every request of the response
at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from hwlm.outputs import RequestOutput
from hwlm.server.choice_stream import ChoiceFeed, Progress, choice_feed
from hwlm.server.common import usage_counts
from hwlm.server.disconnect import cancel_on_disconnect
from hwlm.server.endpoint import EndpointShape
from hwlm.server.engine_seam import EngineDeadError, OutputStream, Seam, abort_all
from hwlm.server.errors import APIError, invalid_request
from hwlm.server.fan_in import OutputFanIn
from hwlm.server.protocol import SamplingRequest, now, random_id
from hwlm.server.sse import (
    SSE_DONE,
    ChunkEncoder,
    EventStreamResponse,
    choices_response,
    sse_event,
)

logger = logging.getLogger(__name__)

Admit = Callable[[SamplingRequest], None]


async def serve_generation(
    seam: Seam, shape: EndpointShape, admit: Admit, raw: Request
) -> Response:
    """Answer ``shape.request``: a JSON body, or server-sent events with ``stream``."""
    request = shape.request
    admit(request)
    plan = await shape.plan(seam)
    request_id = random_id(shape.id_prefix)
    try:
        streams = await seam.submit(
            request_id,
            plan.prompts,
            plan.params,
            stream=request.stream,
            priority=request.priority,
        )
    except ValueError as exc:  # the engine rejected a prompt or a parameter
        raise invalid_request(exc, default=plan.param) from exc
    logger.debug("%s: %d prompt(s), stream=%s", request_id, len(streams), request.stream)
    try:
        await shape.accepted(seam)
    except BaseException:
        abort_all(streams)
        raise
    if request.stream:
        n, every_token = request.n, shape.streams_every_token
        feeds = [choice_feed(s, i, n, every_token) for i, s in enumerate(streams)]
        return EventStreamResponse(
            _events(shape, request_id, feeds),
            background=BackgroundTask(_abort_all, streams),  # runs even if never iterated
        )
    try:
        outputs = await cancel_on_disconnect(raw, _final_outputs(streams))
    finally:
        abort_all(streams)
    head = {"id": request_id, "object": shape.object_name, "created": now(), "model": shape.model}
    tail = shape.response(outputs)
    del outputs  # the choices hold what the body needs
    choices = tail.pop("choices")
    return choices_response(head, choices, tail)


async def _final_outputs(streams: list[OutputStream]) -> list[RequestOutput]:
    fan_in = OutputFanIn(streams)
    try:
        return await fan_in.final_outputs()
    finally:
        fan_in.close()


async def _abort_all(streams: list[OutputStream]) -> None:
    """``abort_all``, on the event loop (a BackgroundTask runs a plain function on a thread)."""
    abort_all(streams)


async def _events(
    shape: EndpointShape, request_id: str, feeds: list[ChoiceFeed]
) -> AsyncIterator[bytes]:
    """The stream's events: one per choice with something new, each carrying everything that
    choice has new; the usage (if asked for); an error event if the engine fails; [DONE].
    Each item is what one read gave (one write); the last ends with [DONE]."""
    request = shape.request
    encoder = ChunkEncoder(
        request_id, shape.chunk_object, now(), shape.model, request.include_usage
    )
    encode, chunk_choice = encoder.choice, shape.chunk_choice
    fan_in = OutputFanIn(feeds)
    latest: dict[int, Progress] = {}  # prompt index -> its progress
    events: list[bytes] = []  # not yet sent
    try:
        opening = [encode(choice) for choice in shape.opening_choices()]
        if opening:
            yield b"".join(opening)
        while batch := await fan_in.next_outputs():
            for prompt_index, progress in batch:
                latest[prompt_index] = progress
                for update in progress.updates():
                    events.append(encode(chunk_choice(update)))
            if fan_in.done:
                break  # these go out with the end of the stream
            if events:
                yield events[0] if len(events) == 1 else b"".join(events)
                events.clear()
        if request.include_usage:
            prompt_tokens = completion_tokens = 0
            for progress in latest.values():
                prompt, completion = progress.usage_counts()
                prompt_tokens += prompt
                completion_tokens += completion
            events.append(encoder.usage(usage_counts(prompt_tokens, completion_tokens)))
    except EngineDeadError as exc:
        events.append(sse_event(APIError(str(exc), 503).body()))
    except Exception:
        logger.exception("%s: streaming failed", request_id)
        events.append(sse_event(APIError("internal server error", 500).body()))
    finally:
        fan_in.close()
    events.append(SSE_DONE)
    yield b"".join(events)
