"""Streaming: a client that falls behind gets what piled up in one event, and every chunk is an
OpenAI chunk.

The app runs in this process on the real engine (hwlm-tiny) and is called as ASGI directly, so
the test plays a slow client exactly: the server's ``send`` of an event returns only when the
client takes it, and the first one is taken only once the engine has finished the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("orjson")

from hwlm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from hwlm.server.async_engine import AsyncLLMEngine, EngineDeadError  # noqa: E402

GREEDY_64 = {"max_tokens": 64, "temperature": 0, "ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def served(device: str) -> Iterator[tuple[Any, AsyncLLMEngine]]:
    from hwlm.engine.llm_engine import EngineArgs, LLMEngine
    from hwlm.server.api import build_app

    engine = AsyncLLMEngine(
        LLMEngine(EngineArgs("hwlm-tiny", device=device, max_num_seqs=8, num_kv_blocks=160))
    )
    try:
        yield build_app(engine, "hwlm-tiny", None), engine
    finally:
        engine.shutdown()


def _post(app: Any, path: str, body: dict[str, Any]) -> Any:
    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
            return response.json()

    return asyncio.run(main())


async def _until_finished(engine: AsyncLLMEngine, timeout: float = 60) -> None:
    """Until the engine tracks no request: every output has been handed to its stream."""
    deadline = time.monotonic() + timeout
    while (await engine.get_stats()).num_streams:
        assert time.monotonic() < deadline, "the request did not finish"
        await asyncio.sleep(0.01)


def _stream_slowly(app: Any, engine: AsyncLLMEngine, path: str, body: dict[str, Any]) -> list[Any]:
    """The events of a streamed request (JSON payloads, then "[DONE]") read by a client that
    takes the first event only after the engine has finished the request."""
    payload = json.dumps({**body, "stream": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }

    async def main() -> bytes:
        requested = False
        body_parts: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await asyncio.Future()  # the client stays connected
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] != "http.response.body":
                assert message["type"] != "http.response.start" or message["status"] == 200
                return
            if not body_parts:
                await _until_finished(engine)  # the client is busy elsewhere meanwhile
            body_parts.append(message.get("body", b""))

        await app(scope, receive, send)
        return b"".join(body_parts)

    events = []
    for event in asyncio.run(main()).split(b"\n\n"):
        if event:
            assert event.startswith(b"data: "), event
            data = event[len(b"data: ") :].decode()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _concat(choices: list[dict[str, Any]], key: str) -> list[Any]:
    return [value for c in choices for value in c["logprobs"][key]]


def test_slow_reader_gets_what_piled_up_in_one_event(served: Any) -> None:
    app, engine = served
    body = {**GREEDY_64, "prompt": "Once upon a time", "logprobs": 2}
    whole = _post(app, "/v1/completions", body)["choices"][0]
    assert len(whole["logprobs"]["tokens"]) == 64
    events = _stream_slowly(app, engine, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    choices = [event["choices"][0] for event in events[:-1]]
    # The first token's event, then one for the 63 or so that piled up while it was unread
    # (one event per token: 64).
    assert len(choices) <= 2, [c["text"] for c in choices]
    assert "".join(c["text"] for c in choices) == whole["text"]
    assert [c["finish_reason"] for c in choices][-1] == "length"
    for key in ("tokens", "text_offset"):
        assert _concat(choices, key) == whole["logprobs"][key]
    values = _concat(choices, "token_logprobs")
    assert values == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-4)
    assert len(_concat(choices, "top_logprobs")) == 64


def test_slow_chat_reader_gets_one_content_event(served: Any) -> None:
    app, engine = served
    body = {**GREEDY_64, "messages": MESSAGES, "logprobs": True, "top_logprobs": 1}
    whole = _post(app, "/v1/chat/completions", body)
    events = _stream_slowly(
        app, engine, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    role, content, usage, done = events[0], events[1:-2], events[-2], events[-1]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert len(content) == 1  # everything arrived while the role chunk was unread
    choice = content[0]["choices"][0]
    assert choice["delta"]["content"] == whole["choices"][0]["message"]["content"]
    assert len(choice["logprobs"]["content"]) == whole["usage"]["completion_tokens"] == 64
    assert choice["finish_reason"] == "length"


def test_slow_reader_of_several_prompts_and_samples(served: Any) -> None:
    app, engine = served
    body = {
        "max_tokens": 32,
        "ignore_eos": True,
        "temperature": 0.8,
        "seed": 7,  # a seeded request samples the same tokens in any batch
        "prompt": ["Once upon a time", "The sky is"],
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    whole = _post(app, "/v1/completions", body)
    events = _stream_slowly(app, engine, "/v1/completions", body)
    chunks, usage = events[:-2], events[-2]
    assert usage["usage"] == whole["usage"]
    texts: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert len(chunks) <= 2 * 4  # at most two events per choice (one per token: 4 * 32)


def test_chunks_are_openai_chunks(served: Any) -> None:
    openai_types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletionChunk

    app, engine = served
    usage = {"stream_options": {"include_usage": True}}
    chat = _stream_slowly(
        app,
        engine,
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 4, "n": 2, "logprobs": True, **usage},
    )
    for event in chat[:-1]:
        chunk = ChatCompletionChunk.model_validate(event)
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        assert set(event) == {"id", "object", "created", "model", "choices", "usage"}
    assert chat[-2]["usage"]["completion_tokens"] == 8
    completions = _stream_slowly(
        app, engine, "/v1/completions", {"prompt": "Hi", "max_tokens": 4, "logprobs": 1}
    )
    for event in completions[:-1]:
        assert set(event) == {"id", "object", "created", "model", "choices"}  # no usage asked
        # OpenAI streams a null finish_reason until a choice's last chunk; its type has none.
        choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in event["choices"]]
        chunk = openai_types.Completion.model_validate({**event, "choices": choices})
        assert chunk.object == "text_completion" and chunk.model == "hwlm-tiny"


# OutputFanIn on scripted streams -----------------------------------------------------------------


class _ScriptedStream:
    """An OutputStream fed by the test: queued outputs (cumulative) or an error."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.aborted = False
        self.done = False

    def put(self, tokens: int, finished: bool = False) -> None:
        completion = CompletionOutput(
            index=0,
            text="x" * tokens,
            token_ids=[1] * tokens,
            cumulative_logprob=None,
            logprobs=None,
            finish_reason="length" if finished else None,
        )
        self.queue.put_nowait(RequestOutput("r", None, [1], [completion], finished))

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        return self._check(await self.queue.get())

    def take_pending(self) -> RequestOutput | None:
        newest = None
        while not self.done and not self.queue.empty():
            newest = self._check(self.queue.get_nowait())
        return newest

    def _check(self, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.done = item.finished
        return item

    def abort(self) -> None:
        self.aborted = True


def _tokens(batch: list[tuple[int, RequestOutput]]) -> list[tuple[int, int]]:
    return [(i, len(output.outputs[0].token_ids)) for i, output in batch]


def test_fan_in_returns_only_the_newest_of_what_waits() -> None:
    from hwlm.server.fan_in import OutputFanIn

    async def main() -> None:
        one, two = _ScriptedStream(), _ScriptedStream()
        fan_in = OutputFanIn([one, two])
        for tokens in (1, 2, 3):
            one.put(tokens)
        two.put(1)
        assert _tokens(await fan_in.next_outputs()) == [(0, 3), (1, 1)]
        waiting = asyncio.ensure_future(fan_in.next_outputs())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # nothing new: it waits, and returns as soon as one has some
        two.put(2)
        two.put(3, finished=True)
        assert _tokens(await waiting) == [(1, 3)]
        one.put(4, finished=True)
        assert _tokens(await fan_in.next_outputs()) == [(0, 4)]
        assert await fan_in.next_outputs() == []
        fan_in.close()
        assert one.aborted and two.aborted

    asyncio.run(main())


def test_fan_in_raises_a_stream_error_and_close_aborts_the_rest() -> None:
    from hwlm.server.fan_in import OutputFanIn

    async def main() -> None:
        one, two = _ScriptedStream(), _ScriptedStream()
        fan_in = OutputFanIn([one, two])
        one.put(1)
        one.queue.put_nowait(EngineDeadError("the engine failed"))
        with pytest.raises(EngineDeadError):
            await fan_in.next_outputs()
        fan_in.close()
        assert two.aborted

    asyncio.run(main())


# The server extra's event loop and HTTP parser ---------------------------------------------------


def test_serve_picks_uvloop_and_httptools_when_installed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hwlm.cli import serve

    caplog.set_level(logging.INFO, logger="hwlm.cli.serve")
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: object())
    assert serve.event_loop_and_http_parser() == ("uvloop", "httptools")
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    assert serve.event_loop_and_http_parser() == ("asyncio", "h11")
    assert "uvicorn: uvloop event loop, httptools HTTP parser" in caplog.text
    assert "uvicorn: asyncio event loop, h11 HTTP parser" in caplog.text
