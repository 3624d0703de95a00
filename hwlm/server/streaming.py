"""Plumbing shared by the completion handlers: adding a request's prompts to the engine,
merging their output streams, server-sent events, and cancelling work when the client leaves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from fastapi import Request

from hwlm.outputs import RequestOutput
from hwlm.sampling_params import SamplingParams
from hwlm.server.async_engine import AsyncLLMEngine, PromptType, RequestStream
from hwlm.server.errors import ClientDisconnected, invalid_request

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def sse(payload_json: str) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {payload_json}\n\n"


def text_delta(sent: str, text: str) -> str:
    """What to send after ``sent`` so that the client ends up with ``text``.

    ``text`` normally extends ``sent``; if the final full decode differs from the incremental
    text (it can around multi-byte characters), send what follows their common prefix."""
    if text.startswith(sent):
        return text[len(sent) :]
    common = 0
    for a, b in zip(sent, text, strict=False):
        if a != b:
            break
        common += 1
    logger.debug("streamed text diverged from the final text after %d characters", common)
    return text[common:]


async def add_requests(
    engine: AsyncLLMEngine,
    base_id: str,
    prompts: Sequence[PromptType],
    params: SamplingParams,
    stream: bool,
    param: str = "prompt",
) -> list[RequestStream]:
    """Add one engine request per prompt (ids ``base_id-i``), all in one round trip to the engine
    thread; all or none: if the engine rejects one, the others are aborted and a 400 APIError
    names the reason."""
    results = await asyncio.gather(
        *(
            engine.add_request(f"{base_id}-{i}", prompt, params, stream=stream)
            for i, prompt in enumerate(prompts)
        ),
        return_exceptions=True,
    )
    streams = [r for r in results if isinstance(r, RequestStream)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        abort_all(streams)
        if isinstance(errors[0], ValueError):
            raise invalid_request(errors[0], default=param) from errors[0]
        raise errors[0]
    return streams


def abort_all(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


async def merge_streams(
    streams: Sequence[RequestStream],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index. Leaving early
    aborts every stream."""
    pending: dict[asyncio.Future[RequestOutput], int] = {
        asyncio.ensure_future(s.__anext__()): i for i, s in enumerate(streams)
    }
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    output = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(streams[index].__anext__())] = index
                yield index, output
    finally:
        for future in pending:
            future.cancel()
        abort_all(streams)


async def final_outputs(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """The finished output of every stream, in order."""
    results: list[RequestOutput | None] = [None] * len(streams)
    async for index, output in merge_streams(streams):
        if output.finished:
            results[index] = output
    if any(r is None for r in results):
        raise RuntimeError("a request ended without a finished output")
    return [r for r in results if r is not None]


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (so that its requests are aborted) if the client
    disconnects first; then ClientDisconnected is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
