"""One process's HTTP side of ``hwlm bench serve``: streamed OpenAI completions and chat
completions read with aiohttp and parsed with orjson (the standard json module if it is missing).

Every content chunk is timed as it arrives: the first gives the time to first token, the gaps
between the next ones the inter-token latencies (events that arrive in one read share a time).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from hwlm.bench.datasets import BenchRequest

try:
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
    dumps: Callable[[Any], bytes] = orjson.dumps
    HAVE_ORJSON = True
except ImportError:  # pragma: no cover - orjson is in the bench extra
    import json

    loads = json.loads
    HAVE_ORJSON = False

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


logger = logging.getLogger(__name__)


CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
ENDPOINTS = (COMPLETIONS_ENDPOINT, CHAT_ENDPOINT)


@dataclass
class RequestResult:
    index: int
    prompt_len: int | None = None  # the dataset's count, else the server's usage.prompt_tokens
    sent_at: float = 0.0  # time.perf_counter() when the request was sent
    text: str = ""
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    latency_s: float = 0.0
    aborted: bool = False  # abandoned by design (abort_fraction)
    error: str | None = None
    status: int | None = None
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return not self.aborted and self.error is None


@dataclass(frozen=True)
class ClientSettings:
    """What every request shares: where it goes and how it samples."""

    base_url: str
    model: str
    endpoint: str = COMPLETIONS_ENDPOINT
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0


def import_aiohttp() -> Any:
    """aiohttp, or a one-line ValueError saying how to get it."""
    try:
        import aiohttp
    except ImportError as exc:
        raise ValueError(
            "hwlm bench serve needs aiohttp: pip install 'hwlm[bench]' (or aiohttp orjson)"
        ) from exc
    _warn_without_orjson()
    return aiohttp


@functools.cache
def _warn_without_orjson() -> None:
    if not HAVE_ORJSON:  # measured: a client process reads ~20-40% fewer events a second
        logger.warning("orjson is not installed: events are parsed with the json module, slower")


@asynccontextmanager
async def open_client(settings: ClientSettings) -> AsyncIterator[StreamClient]:
    """A StreamClient over one aiohttp session with no connection limit."""
    aiohttp = import_aiohttp()
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        yield StreamClient(session, settings)


async def first_model(settings: ClientSettings) -> str:
    """The id of the server's first model (GET /v1/models); ValueError when it cannot be read."""
    aiohttp = import_aiohttp()
    url = settings.base_url + "/v1/models"
    try:
        async with aiohttp.ClientSession(headers=_headers(settings)) as session:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                body = await response.read()
                if response.status != 200:
                    raise ValueError(f"GET {url} answered HTTP {response.status}: {body[:200]!r}")
                return str(loads(body)["data"][0]["id"])
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise ValueError(f"server not reachable at {settings.base_url}: {exc}") from exc


def _headers(settings: ClientSettings) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return headers


class StreamClient:
    """Sends requests and reads their event streams."""

    def __init__(self, session: Any, settings: ClientSettings) -> None:
        self.session = session
        self.settings = settings
        self.url = settings.base_url + settings.endpoint
        self.headers = _headers(settings)
        self.chat = settings.endpoint == CHAT_ENDPOINT

    def body(self, request: BenchRequest) -> bytes:
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "temperature": s.temperature,
            "ignore_eos": s.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            body["max_completion_tokens"] = request.output_len
        else:
            body["prompt"] = request.prompt
            body["max_tokens"] = request.output_len
        return dumps(body)

    async def run(self, request: BenchRequest, sent_at: float | None = None) -> RequestResult:
        """Send ``request`` and read its stream. Times count from ``sent_at`` (a
        ``time.perf_counter()`` of this machine, possibly taken in another process) or now."""
        start = time.perf_counter() if sent_at is None else sent_at
        result = RequestResult(request.index, request.prompt_len, start)
        try:
            await self._stream(request, result, start)
        except Exception as exc:  # a transport failure counts as a failed request
            result.error = f"{type(exc).__name__}: {exc}"
        result.latency_s = time.perf_counter() - start
        return result

    async def _stream(self, request: BenchRequest, result: RequestResult, start: float) -> None:
        async with self.session.post(
            self.url, data=self.body(request), headers=self.headers
        ) as response:
            result.status = response.status
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return
            reader = _EventReader(result, start, self.chat, request.abort_after)
            pending = b""
            async for data in response.content.iter_any():
                now = time.perf_counter()
                events = (pending + data).split(b"\n\n")
                pending = events.pop()
                if reader.feed(events, now):
                    if result.aborted:
                        response.close()  # drops the connection: the server sees the abort
                    break
            result.text = "".join(reader.pieces)
            if not result.output_tokens:  # no usage in the stream: count the content chunks
                result.output_tokens = reader.chunks


class _EventReader:
    """Folds server-sent events into a RequestResult; ``feed`` returns True when the stream is
    over for the client (done, failed or abandoned)."""

    def __init__(
        self, result: RequestResult, start: float, chat: bool, abort_after: int | None
    ) -> None:
        self.result = result
        self.last = start
        self.start = start
        self.chat = chat
        self.abort_after = abort_after
        self.chunks = 0
        self.pieces: list[str] = []

    def feed(self, events: list[bytes], now: float) -> bool:
        result = self.result
        for event in events:
            if not event.startswith(b"data:"):
                continue
            payload = event[5:].strip()
            if payload == b"[DONE]":
                return True
            data = loads(payload)
            if "error" in data:
                error = data["error"]
                result.error = str(error.get("message") if isinstance(error, dict) else error)
                return True
            usage = data.get("usage")
            if usage:
                result.output_tokens = usage.get("completion_tokens") or result.output_tokens
                result.prompt_len = result.prompt_len or usage.get("prompt_tokens")
            for choice in data.get("choices") or ():
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
                piece = (
                    (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                )
                if piece:
                    self._content(piece, now)
            if self.abort_after is not None and self.chunks >= self.abort_after:
                result.aborted = True
                result.output_tokens = self.chunks
                return True
        return False

    def _content(self, piece: str, now: float) -> None:
        if self.result.ttft_s is None:
            self.result.ttft_s = now - self.start
        else:
            self.result.itl_s.append(now - self.last)
        self.last = now
        self.chunks += 1
        self.pieces.append(piece)
