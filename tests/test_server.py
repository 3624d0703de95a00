"""The OpenAI-compatible server.

Three layers, cheapest first:

* ``AsyncLLMEngine`` over a scripted fake engine (no model): streaming, error propagation,
  aborts, idling without spinning, and a failing step.
* A real ``python -m hwlm.server`` process (hwlm-tiny, with --api-key) driven over HTTP with
  httpx: the routes, OpenAI response shapes, greedy equality with ``LLM.generate``, and every
  error case -- each followed by a request that must still succeed.
* A real uvicorn server on a thread of this process, so that after a client disconnects the test
  can inspect the engine itself (``AsyncLLMEngine.get_stats``: no running or waiting request, all
  KV blocks free) and see that the request was aborted rather than left to finish. An ASGI
  transport cannot show this: httpx.ASGITransport buffers whole responses, so there is no
  mid-stream disconnect to observe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from hwlm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from hwlm.sampling_params import SamplingParams  # noqa: E402
from hwlm.server.async_engine import AsyncLLMEngine, EngineDeadError  # noqa: E402
from tests.server_helpers import (  # noqa: E402
    ROOT,
    free_port,
    metric,
    parse_metrics,
    server_process,
    sse_events,
    wait_idle,
    wait_ready,
)

API_KEY = "test-key-123"
MAX_MODEL_LEN = 256


# A scripted engine ------------------------------------------------------------------------------


class FakeTokenizer:
    """Two tokens per text."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [1, 2]}


class FakeEngine:
    """Enough of LLMEngine for AsyncLLMEngine: each request makes one token ("x") per step."""

    def __init__(self, fail_at_step: int | None = None, tokens: int = 3) -> None:
        self.tokenizer = FakeTokenizer()
        self.config = type("Config", (), {"max_model_len": 64})()
        self.max_logprobs = 20
        self.fail_at_step = fail_at_step
        self.tokens = tokens
        self.requests: dict[str, tuple[list[int], bool]] = {}
        self.steps = 0
        self.aborted: list[str] = []
        self.scheduler = type(
            "Scheduler",
            (),
            {
                "running": [],
                "waiting": [],
                "num_preemptions": 0,
                "num_running_seqs": lambda self: 0,
                "num_waiting_seqs": lambda self: 0,
            },
        )()
        self.block_manager = type(
            "Blocks",
            (),
            {
                "num_free_blocks": 4,
                "num_blocks": 4,
                "prefix_query_tokens": 0,
                "prefix_hit_tokens": 0,
            },
        )()

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        stream: bool = False,
        priority: int = 0,
        group: str | None = None,
    ) -> None:
        if prompt == "bad":
            raise ValueError("this prompt is bad")
        self.requests[request_id] = ([], stream)

    def abort_request(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("boom")
        time.sleep(0.002)
        outputs = []
        for request_id, (tokens, stream) in list(self.requests.items()):
            tokens.append(7)
            finished = len(tokens) >= self.tokens
            if finished:
                del self.requests[request_id]
            if finished or stream:
                completion = CompletionOutput(
                    0, "x" * len(tokens), list(tokens), None, None, "length" if finished else None
                )
                outputs.append(RequestOutput(request_id, "p", [1, 2], [completion], finished))
        return outputs


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_async_engine_streams_and_finishes() -> None:
    engine = AsyncLLMEngine(FakeEngine(tokens=3))

    async def main() -> tuple[list[str], list[RequestOutput]]:
        streamed = [o.outputs[0].text async for o in engine.generate("p", SamplingParams(), "a")]
        final = [o async for o in engine.generate("p", SamplingParams(), "b", stream=False)]
        return streamed, final

    try:
        streamed, final = _run(main())
        assert streamed[-1] == "xxx" and all(
            b.startswith(a) for a, b in zip(streamed, streamed[1:], strict=False)
        )
        assert len(final) == 1 and final[0].finished and final[0].outputs[0].text == "xxx"
    finally:
        engine.shutdown()


def test_async_engine_add_errors_raise_before_output() -> None:
    engine = AsyncLLMEngine(FakeEngine())

    async def main() -> None:
        with pytest.raises(ValueError, match="bad"):
            async for _ in engine.generate("bad", SamplingParams(), "a"):
                pytest.fail("no output may come before the error")
        assert [o.finished async for o in engine.generate("p", SamplingParams(), "a")][-1]

    try:
        _run(main())
    finally:
        engine.shutdown()


def test_async_engine_leaving_early_aborts_and_idles() -> None:
    fake = FakeEngine(tokens=10_000)
    engine = AsyncLLMEngine(fake)

    async def main() -> None:
        async with contextlib.aclosing(engine.generate("p", SamplingParams(), "a")) as outputs:
            async for _ in outputs:
                break
        task = asyncio.ensure_future(_consume(engine.generate("p", SamplingParams(), "b")))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        stats = await engine.get_stats()
        assert stats.num_streams == 0

    try:
        _run(main())
        _wait_until(lambda: not fake.requests)
        assert sorted(fake.aborted) == ["a", "b"]
        steps = fake.steps
        time.sleep(0.2)
        assert fake.steps == steps, "an idle engine must not step"
        assert engine.is_healthy()
    finally:
        engine.shutdown()


async def _consume(outputs: Any) -> None:
    async for _ in outputs:
        pass


def test_async_engine_failed_step_fails_requests_and_marks_dead() -> None:
    engine = AsyncLLMEngine(FakeEngine(fail_at_step=2, tokens=100))

    async def main() -> None:
        with pytest.raises(EngineDeadError, match="boom"):
            await _consume(engine.generate("p", SamplingParams(), "a"))
        with pytest.raises(EngineDeadError):
            await _consume(engine.generate("p", SamplingParams(), "b"))

    try:
        _run(main())
        assert not engine.is_healthy()
    finally:
        engine.shutdown()


def test_dead_engine_gives_503() -> None:
    from hwlm.server.api import build_app

    engine = AsyncLLMEngine(FakeEngine(fail_at_step=1))

    async def main() -> None:
        transport = httpx.ASGITransport(app=build_app(engine, "fake", None))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post("/v1/completions", json={"prompt": "p", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["message"].startswith("the engine failed")
            assert (await client.get("/health")).status_code == 503
            metrics = await client.get("/metrics")  # still answers: counters, zero gauges
            assert metrics.status_code == 200
            samples = parse_metrics(metrics.text)
            assert metric(samples, "hwlm:request_success_total", finished_reason="abort") == 1
            assert metric(samples, "hwlm:num_requests_running", model_name="fake") == 0

    try:
        _run(main())
    finally:
        engine.shutdown()


def _wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# A real server process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["hwlm-tiny", "--device", device]
    args += ["--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with server_process(args, log, headers, env={"HWLM_API_KEY": ""}) as base_url:
        yield base_url
    assert API_KEY not in log.read_text(), "the API key must never be logged"


@pytest.fixture()
def client(server: str) -> Iterator[Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server, headers=headers, timeout=30) as c:
        yield c


def test_health_version_models(client: Any, server: str) -> None:
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed
    assert httpx.get(f"{server}/version").json()["version"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "hwlm-tiny"
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN


@pytest.fixture(scope="module")
def reference(device: str) -> Any:
    from hwlm import LLM

    return LLM("hwlm-tiny", device=device, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)


def test_completion_greedy_equals_llm_generate(client: Any, reference: Any) -> None:
    prompt = "The quick brown fox"
    expected = reference.generate(
        prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )[0]
    assert expected.outputs[0].token_ids, "a vacuous comparison: the reference generated nothing"
    r = client.post(
        "/v1/completions",
        json={"model": "hwlm-tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "hwlm-tiny"
    choice = body["choices"][0]
    assert choice["text"] == expected.outputs[0].text
    assert choice["finish_reason"] == expected.outputs[0].finish_reason
    prompt_tokens, completion_tokens = (
        len(expected.prompt_token_ids),
        len(expected.outputs[0].token_ids),
    )
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

    # Token-id prompts, and the same tokens again through the stream.
    ids = expected.prompt_token_ids
    by_ids = client.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}
    ).json()
    assert by_ids["choices"][0]["text"] == expected.outputs[0].text
    with client.stream(
        "POST",
        "/v1/completions",
        json={
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == body["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.outputs[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.outputs[0].finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completion_batch_echo_and_logprobs(client: Any) -> None:
    r = client.post(
        "/v1/completions",
        json={
            "prompt": ["Hello", "Hi there"],
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 6
    echo = client.post(
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 2, "echo": True, "ignore_eos": True},
    ).json()
    assert echo["choices"][0]["text"].startswith("Hello")
    lp = client.post(
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 3, "logprobs": 2, "ignore_eos": True},
    ).json()
    logprobs = lp["choices"][0]["logprobs"]
    assert (
        len(logprobs["tokens"])
        == len(logprobs["token_logprobs"])
        == len(logprobs["top_logprobs"])
        == 3
    )
    assert all(v <= 0 for v in logprobs["token_logprobs"])


def test_chat_completion(client: Any, reference: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    expected = reference.chat(
        messages, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False
    )[0]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "hwlm-tiny", "messages": messages, "max_tokens": 6, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.outputs[0].text}
    assert body["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == len(expected.outputs[0].token_ids)

    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": messages,
            "max_completion_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 2,
        },
    ) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    first, chunks, usage_chunk = events[0], events[1:-2], events[-2]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        == expected.outputs[0].text
    )
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks) == len(
        expected.outputs[0].token_ids
    )
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == body["usage"]


ERROR_CASES = [
    ("bad json", "/v1/completions", b'{"prompt": "hi", ', 400),
    ("wrong type", "/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400),
    ("no prompt", "/v1/completions", {"max_tokens": 2}, 400),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400),
    ("negative temperature", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("prompt too long", "/v1/completions", {"prompt": list(range(3, 3 + MAX_MODEL_LEN + 5))}, 400),
    (
        "prompt plus max_tokens too long",
        "/v1/completions",
        {"prompt": list(range(3, 3 + MAX_MODEL_LEN - 10)), "max_tokens": 20},
        400,
    ),
    ("n=0", "/v1/completions", {"prompt": "hi", "n": 0}, 400),
    ("best_of < n", "/v1/completions", {"prompt": "hi", "n": 3, "best_of": 2}, 400),
    ("presence_penalty 3", "/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400),
    ("logit_bias 500", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, 400),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400),
    ("empty stop string", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400),
    (
        "chat n=0",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "n": 0},
        400,
    ),
    ("chat no messages", "/v1/chat/completions", {"messages": []}, 400),
    (
        "chat bad top_p",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 2},
        400,
    ),
    (
        "chat image part",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
    ),
]


@pytest.mark.parametrize("name,path,body,status", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_are_openai_bodies_and_the_server_survives(
    client: Any, name: str, path: str, body: Any, status: int
) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if name == "prompt too long":
        assert str(MAX_MODEL_LEN) in error["message"]
    if name == "prompt plus max_tokens too long":
        message = f"maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
        assert message in error["message"] and error["param"] == "max_tokens"
    if name in ("n=0", "presence_penalty 3", "logit_bias 500"):
        assert error["param"] == name.split()[0].split("=")[0], error
    ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_api_key(server: str) -> None:
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{server}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(f"{server}/v1/completions", json=body, headers=good).status_code == 200
    openai = pytest.importorskip("openai")
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    right = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    assert right.completions.create(model="hwlm-tiny", prompt="hi", max_tokens=2).choices


# An in-process server, to look inside the engine after a disconnect -------------------------------


class _ThreadedServer:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        base_url = f"http://127.0.0.1:{self.port}"
        wait_ready(base_url, None, None)
        return base_url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def inprocess(device: str) -> Iterator[tuple[str, AsyncLLMEngine, list[str]]]:
    from hwlm.engine.llm_engine import EngineArgs, LLMEngine
    from hwlm.server.api import build_app

    llm_engine = LLMEngine(
        EngineArgs("hwlm-tiny", device=device, max_num_seqs=8, num_kv_blocks=160)
    )
    aborted: list[str] = []
    abort = llm_engine.abort_request

    def recording_abort(request_id: str) -> None:
        aborted.append(request_id)
        abort(request_id)

    llm_engine.abort_request = recording_abort  # type: ignore[method-assign]
    engine = AsyncLLMEngine(llm_engine)
    try:
        with _ThreadedServer(build_app(engine, "hwlm-tiny", None)) as base_url:
            yield base_url, engine, aborted
    finally:
        engine.shutdown()


LONG = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}


def test_stream_disconnect_aborts_and_frees_blocks(inprocess: Any) -> None:
    base_url, engine, aborted = inprocess
    with httpx.Client(base_url=base_url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        # leaving the block closes the connection mid-stream
        wait_idle(engine, timeout=5)
        assert len(aborted) == 1
        ok = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert ok.status_code == 200, ok.text
    wait_idle(engine, timeout=5)


def test_non_stream_disconnect_aborts(inprocess: Any) -> None:
    base_url, engine, aborted = inprocess
    before = len(aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=LONG, timeout=0.5)
    wait_idle(engine, timeout=5)
    assert len(aborted) == before + 1
    ok = httpx.post(f"{base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_chat_template_override(inprocess: Any, tmp_path: Path) -> None:
    from hwlm.server.api import build_app
    from hwlm.server.chat_template import load_chat_template

    _, engine, _ = inprocess
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert load_chat_template(str(path)) == template
    assert load_chat_template(template.replace("\n", "\\n")) == template  # inline, shell-escaped
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template("no-such-file.jinja")
    app = build_app(engine, "hwlm-tiny", None, chat_template=template)
    messages = [{"role": "user", "content": "hi"}]

    async def main() -> tuple[Any, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            tokens = await client.post("/tokenize", json={"messages": messages})
            chat = await client.post(
                "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}
            )
            return tokens, chat

    tokens, chat = _run(main())
    expected = engine.tokenizer("[user] hi\n", add_special_tokens=False)["input_ids"]
    assert tokens.json()["tokens"] == expected
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(expected)


def test_batch_with_one_rejected_prompt_adds_none(inprocess: Any) -> None:
    base_url, engine, _ = inprocess
    body = {"prompt": [[5, 6, 7], [10**6]], "max_tokens": 500, "ignore_eos": True}
    r = httpx.post(f"{base_url}/v1/completions", json=body)
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"], r.text
    wait_idle(engine, timeout=5)  # the accepted first prompt was aborted, not left running
    ok = httpx.post(f"{base_url}/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_hwlm_chat_reports_a_wrong_key_in_one_line(server: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hwlm.cli", "chat", "--url", server, "--api-key", "wrong"],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "HWLM_API_KEY": ""},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("hwlm: error: 401: missing or invalid API key")
    assert result.stderr.count("\n") == 1 and API_KEY not in result.stderr
