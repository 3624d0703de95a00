"""The server through the official ``openai`` client, against one real ``python -m hwlm.server``
process on 127.0.0.1 (hwlm-tiny) shared by the whole module.

Covers: models.list, completions and chat completions with stream on and off, n=2, logprobs;
greedy text equal to ``LLM.generate``; 32 concurrent streams complete and faster than one at a
time; clients that disconnect mid-stream leave /metrics at 0 running and 0 KV usage; errors
with their status and OpenAI body, each followed by a good request; /tokenize and /detokenize;
the README's curl quick-start; ``hwlm chat --url``.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwlm.sampling_params import SamplingParams  # noqa: E402
from tests.server_helpers import ROOT, metric, parse_metrics, server_process  # noqa: E402

MODEL = "hwlm-tiny"
MAX_MODEL_LEN = 2048  # room for streams long enough to disconnect from
MESSAGES = [{"role": "user", "content": "Hello!"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = [MODEL, "--device", device, "--max-model-len", str(MAX_MODEL_LEN)]
    args += ["--num-kv-blocks", "1024", "--max-num-seqs", "64"]
    log = tmp_path_factory.mktemp("openai") / "server.log"
    with server_process(args, log, env={"HWLM_API_KEY": ""}) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(device: str) -> Any:
    from hwlm import LLM

    return LLM(MODEL, device=device, max_model_len=MAX_MODEL_LEN, num_kv_blocks=1024)


def _greedy(llm: Any, prompt: str, max_tokens: int) -> Any:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def _texts_by_index(chunks: list[Any], chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            piece = (choice.delta.content or "") if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + piece
    return texts


def _finish_reasons(chunks: list[Any]) -> dict[int, str]:
    return {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}


# The openai client ------------------------------------------------------------------------------


def test_models_list(client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_greedy_equal_llm_generate(client: Any, llm: Any, stream: bool) -> None:
    prompt = "The capital of France is"
    expected = _greedy(llm, prompt, 8)
    assert expected.token_ids
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, stream=stream, **GREEDY
    )
    if stream:
        chunks = list(response)
        assert _texts_by_index(chunks, chat=False) == {0: expected.text}
        assert _finish_reasons(chunks) == {0: expected.finish_reason}
    else:
        assert response.choices[0].text == expected.text
        assert response.usage.completion_tokens == len(expected.token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equal_llm_chat(client: Any, llm: Any, stream: bool) -> None:
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = llm.chat(MESSAGES, params, use_tqdm=False)[0].outputs[0]
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, stream=stream, **GREEDY
    )
    if stream:
        chunks = list(response)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert _texts_by_index(chunks, chat=True) == {0: expected.text}
    else:
        assert response.choices[0].message.content == expected.text
        assert response.choices[0].message.role == "assistant"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_n2(client: Any, stream: bool) -> None:
    response = client.completions.create(
        model=MODEL,
        prompt=["Once upon a time", "In a galaxy"],
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=1,
        stream=stream,
        extra_body={"ignore_eos": True},
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    if stream:
        chunks = list(response)
        texts = _texts_by_index(chunks, chat=False)
        assert _finish_reasons(chunks) == dict.fromkeys(range(4), "length")
        assert chunks[-1].usage.completion_tokens == 4 * 6
    else:
        texts = {c.index: c.text for c in response.choices}
        assert response.usage.completion_tokens == 4 * 6
    assert sorted(texts) == [0, 1, 2, 3] and all(texts.values())
    assert texts[0] != texts[1], "two samples of one prompt came out the same"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_n2(client: Any, stream: bool) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        n=2,
        max_tokens=6,
        temperature=1.0,
        stream=stream,
        extra_body={"ignore_eos": True},
    )
    if stream:
        chunks = list(response)
        roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
        assert roles == [0, 1]
        texts = _texts_by_index(chunks, chat=True)
        assert _finish_reasons(chunks) == {0: "length", 1: "length"}
    else:
        texts = {c.index: c.message.content for c in response.choices}
        assert response.usage.completion_tokens == 12
    assert sorted(texts) == [0, 1] and all(texts.values())


@pytest.mark.parametrize("stream", [False, True])
def test_completions_logprobs(client: Any, stream: bool) -> None:
    response = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, logprobs=2, stream=stream,
        extra_body={"ignore_eos": True}, **GREEDY,
    )  # fmt: skip
    if stream:
        chunks = list(response)
        tokens = [t for ch in chunks for t in (ch.choices[0].logprobs.tokens or [])]
        values = [v for ch in chunks for v in (ch.choices[0].logprobs.token_logprobs or [])]
        tops = [t for ch in chunks for t in (ch.choices[0].logprobs.top_logprobs or [])]
        text = _texts_by_index(chunks, chat=False)[0]
    else:
        lp = response.choices[0].logprobs
        tokens, values, tops = lp.tokens, lp.token_logprobs, lp.top_logprobs
        text = response.choices[0].text
    assert len(tokens) == len(values) == len(tops) == 4
    assert "".join(tokens) == text
    assert all(v <= 0 for v in values)
    # greedy: each sampled token is the most likely one
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(tops, values, strict=True))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(client: Any, stream: bool) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3,
        stream=stream, extra_body={"ignore_eos": True}, **GREEDY,
    )  # fmt: skip
    if stream:
        chunks = list(response)
        content = [
            t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content
        ]
    else:
        content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_stop_strings_and_logit_bias_pass_through(client: Any, llm: Any) -> None:
    expected = _greedy(llm, "Count:", 12)
    stop = expected.text[3:6]
    assert len(stop) == 3, "the reference text is too short to cut"
    cut = client.completions.create(
        model=MODEL, prompt="Count:", max_tokens=12, stop=[stop], **GREEDY
    )
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.text == expected.text[: expected.text.index(stop)]
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="Count:", max_tokens=12, stop=[stop], stream=True, **GREEDY
        )
    )
    assert _texts_by_index(streamed, chat=False) == {0: choice.text}  # the stop string never leaks
    assert _finish_reasons(streamed) == {0: "stop"}
    banned = expected.token_ids[0]
    biased = client.completions.create(
        model=MODEL, prompt="Count:", max_tokens=1, logprobs=0,
        logit_bias={str(banned): -100}, **GREEDY,
    )  # fmt: skip
    first = biased.choices[0].logprobs.tokens[0]
    assert first != llm.get_tokenizer().decode([banned])


@pytest.mark.parametrize("stream", [False, True])
def test_completions_echo_with_logprobs(client: Any, llm: Any, stream: bool) -> None:
    prompt = "The sky is blue"
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1, ignore_eos=True)
    expected = llm.generate(prompt, params, use_tqdm=False)[0]
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, stream=stream,
        extra_body={"ignore_eos": True}, **GREEDY,
    )  # fmt: skip
    if stream:
        chunks = list(response)
        text = _texts_by_index(chunks, chat=False)[0]
        values = [v for ch in chunks for v in (ch.choices[0].logprobs.token_logprobs or [])]
    else:
        text = response.choices[0].text
        values = response.choices[0].logprobs.token_logprobs
    assert text == prompt + expected.outputs[0].text
    num_prompt = len(expected.prompt_token_ids)
    assert len(values) == num_prompt + 3 and values[0] is None
    scored = expected.prompt_logprobs
    pairs = zip(expected.prompt_token_ids[1:], scored[1:], values[1:num_prompt], strict=True)
    for token_id, entry, value in pairs:
        assert value == pytest.approx(entry[token_id].logprob, abs=1e-4)


def test_echo_only_scores_the_prompt(client: Any, llm: Any) -> None:
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens 0."""
    prompt = "Paris is the capital of France"
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0
    )
    choice = response.choices[0]
    assert choice.text == prompt
    assert response.usage.completion_tokens == 0
    num_prompt = response.usage.prompt_tokens
    assert len(choice.logprobs.token_logprobs) == num_prompt
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:])


def test_prompt_logprobs(client: Any, llm: Any) -> None:
    prompt = "A prompt to score"
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    expected = llm.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    extra = {"extra_body": {"prompt_logprobs": 2}, "max_tokens": 2, **GREEDY}
    completion = client.completions.create(model=MODEL, prompt=prompt, **extra)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, **extra)
    got = completion.choices[0].model_dump()["prompt_logprobs"]
    assert got[0] is None and len(got) == len(expected)
    for entry, reference in zip(got[1:], expected[1:], strict=True):
        assert {int(k) for k in entry} == set(reference)
        for token_id, lp in reference.items():
            assert entry[str(token_id)]["logprob"] == pytest.approx(lp.logprob, abs=1e-4)
            assert entry[str(token_id)]["rank"] == lp.rank
    chat_lp = chat.model_dump()["prompt_logprobs"]
    assert chat_lp[0] is None and all(chat_lp[1:])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=prompt, stream=True, **extra)


# Concurrency ----------------------------------------------------------------------------------


async def _stream_text(client: Any, prompt: str) -> str:
    stream = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, stream=True,
        extra_body={"ignore_eos": True}, **GREEDY,
    )  # fmt: skip
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


def test_32_concurrent_streams_are_correct_and_faster_than_one_at_a_time(
    server: str, llm: Any
) -> None:
    prompts = [f"Request {i}: the story of the number {i * 7} begins" for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    async def main() -> tuple[list[str], float, list[str], float]:
        async with openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120
        ) as aclient:
            start = time.perf_counter()
            together = await asyncio.gather(*(_stream_text(aclient, p) for p in prompts))
            concurrent_s = time.perf_counter() - start
            start = time.perf_counter()
            one_by_one = [await _stream_text(aclient, p) for p in prompts]
            sequential_s = time.perf_counter() - start
        return list(together), concurrent_s, one_by_one, sequential_s

    together, concurrent_s, one_by_one, sequential_s = asyncio.run(main())
    assert together == expected
    assert one_by_one == expected
    assert concurrent_s < sequential_s, (concurrent_s, sequential_s)


def _metrics(server: str) -> Any:
    response = httpx.get(f"{server}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)


def _metrics_when(server: str, ready: Callable[[Any], bool], timeout: float = 10) -> Any:
    """The first /metrics samples within ``timeout`` seconds for which ``ready`` holds (else the
    last ones, for the caller's asserts to report)."""
    deadline = time.monotonic() + timeout
    samples = _metrics(server)
    while not ready(samples) and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = _metrics(server)
    return samples


def test_disconnected_clients_leave_nothing_running(server: str, client: Any) -> None:
    aborted_before = metric(_metrics(server), "hwlm:request_success_total", finished_reason="abort")
    long = {"max_tokens": 2000, "extra_body": {"ignore_eos": True}, "stream": True}
    streams = [
        client.completions.create(model=MODEL, prompt=f"Tell me a story {i}", **long)
        for i in range(4)
    ]
    for stream in streams:
        next(iter(stream))  # a token arrived: the request is running
    # The engine's load figures reach /metrics a step or so late: wait for them.
    samples = _metrics_when(
        server,
        lambda s: (
            metric(s, "hwlm:num_requests_running") + metric(s, "hwlm:num_requests_waiting") == 4
        ),
    )
    assert metric(samples, "hwlm:kv_cache_usage_perc") > 0
    for stream in streams:
        stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while True:
        samples = _metrics(server)
        running = metric(samples, "hwlm:num_requests_running")
        waiting = metric(samples, "hwlm:num_requests_waiting")
        usage = metric(samples, "hwlm:kv_cache_usage_perc")
        if running == waiting == usage == 0:
            break
        assert time.monotonic() < deadline, (running, waiting, usage)
        time.sleep(0.05)
    aborted = metric(samples, "hwlm:request_success_total", finished_reason="abort")
    assert aborted == aborted_before + 4
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_metrics_count_a_request(server: str, client: Any) -> None:
    before = _metrics(server)
    response = client.completions.create(
        model=MODEL, prompt="Counting tokens", max_tokens=5, extra_body={"ignore_eos": True}
    )
    # The engine's counters reach /metrics a step or so after the response: wait for the request.
    after = _metrics_when(
        server,
        lambda s: (
            metric(s, "hwlm:e2e_request_latency_seconds_count")
            > metric(before, "hwlm:e2e_request_latency_seconds_count")
            and metric(s, "hwlm:generation_tokens_total")
            >= metric(before, "hwlm:generation_tokens_total") + 5
        ),
    )

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("hwlm:prompt_tokens_total") == response.usage.prompt_tokens
    assert delta("hwlm:generation_tokens_total") == 5
    assert delta("hwlm:request_success_total", finished_reason="length") == 1
    assert delta("hwlm:time_to_first_token_seconds_count") == 1
    assert delta("hwlm:e2e_request_latency_seconds_count") == 1
    assert delta("hwlm:inter_token_latency_seconds_count") == 4
    assert delta("hwlm:prefix_cache_queries_total") >= 0
    assert metric(after, "hwlm:num_preemptions_total") >= 0


# Errors -------------------------------------------------------------------------------------------


ERRORS = [
    ("unknown model", {"model": "gpt-9", "prompt": "hi"}, openai.NotFoundError, 404),
    ("bad temperature", {"prompt": "hi", "temperature": -2}, openai.BadRequestError, 400),
    ("bad top_p", {"prompt": "hi", "top_p": 0}, openai.BadRequestError, 400),
    (
        "too long",
        {"prompt": [5] * (MAX_MODEL_LEN - 4), "max_tokens": 16},
        openai.BadRequestError,
        400,
    ),
    ("malformed", {"prompt": {"not": "a prompt"}}, openai.BadRequestError, 400),
]


@pytest.mark.parametrize("name,body,error,status", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_then_success(
    client: Any, name: str, body: dict[str, Any], error: type, status: int
) -> None:
    body = {"model": MODEL, **body}
    with pytest.raises(error) as info:
        client.completions.create(**body)
    assert info.value.status_code == status
    assert set(info.value.body) == {"message", "type", "param", "code"}
    if name == "too long":
        assert f"maximum context length is {MAX_MODEL_LEN} tokens" in info.value.body["message"]
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert ok.choices and ok.usage.completion_tokens >= 1


OUTSIDE_VOCAB = 10**6
# (request, the field its 400 must name): checked by SamplingParams, or by the engine (vocabulary)
PARAM_ERRORS = [
    ({"prompt": "hi", "logit_bias": {str(OUTSIDE_VOCAB): 1}}, "logit_bias"),
    ({"messages": MESSAGES, "logit_bias": {str(OUTSIDE_VOCAB): 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": "hi", "stop_token_ids": [OUTSIDE_VOCAB]}, "stop_token_ids"),
    ({"messages": MESSAGES, "stop_token_ids": [OUTSIDE_VOCAB]}, "stop_token_ids"),
    ({"prompt": "hi", "best_of": 2, "temperature": 1, "stream": True}, "best_of"),
    ({"prompt": "hi", "best_of": 2, "n": 3, "temperature": 1}, "best_of"),
    ({"prompt": "hi", "allowed_token_ids": [1, OUTSIDE_VOCAB]}, "allowed_token_ids"),
    ({"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"messages": MESSAGES, "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "bad_words": [""]}, "bad_words"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    # The engine refuses a priority under the default fcfs policy (vLLM's rule).
    ({"prompt": "hi", "priority": 1}, "priority"),
    ({"messages": MESSAGES, "priority": -2}, "priority"),
]


@pytest.mark.parametrize(
    "body,param",
    PARAM_ERRORS,
    ids=[f"{p}-{'chat' if 'messages' in b else 'cmpl'}" for b, p in PARAM_ERRORS],
)
def test_errors_name_the_field_at_fault(server: str, body: dict[str, Any], param: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(f"{server}{path}", json={"model": MODEL, **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert param in error["message"], error


# Tokenize, curl, hwlm chat --------------------------------------------------------------------


def test_tokenize_and_detokenize(server: str, llm: Any) -> None:
    tokenizer = llm.get_tokenizer()
    text = "San Francisco is a"
    r = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer(text)["input_ids"]
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] is None
    strs = httpx.post(
        f"{server}/tokenize", json={"prompt": text, "return_token_strs": True}
    ).json()["token_strs"]
    assert strs == tokenizer.convert_ids_to_tokens(body["tokens"])
    chat = httpx.post(f"{server}/tokenize", json={"messages": MESSAGES}).json()
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    back = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": tokenizer.decode(body["tokens"])}
    for path, bad in (("/detokenize", {"tokens": [10**9]}), ("/tokenize", {})):
        r = httpx.post(f"{server}{path}", json=bad)
        assert r.status_code == 400 and r.json()["error"]["message"]


def _readme_curls() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"^curl .*?(?<!\\)$", text.replace("\\\n", " "), flags=re.M)
    assert len(commands) >= 3, "the README lost vLLM's curl quick-start"
    return commands


@pytest.mark.skipif(sys.platform == "win32", reason="needs curl")
def test_readme_curl_quickstart(server: str) -> None:
    for command in _readme_curls():
        argv = shlex.split(command.replace("http://localhost:8000", server))
        result = subprocess.run([*argv, "-sS", "--fail-with-body"], capture_output=True, timeout=60)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        assert b'"error"' not in result.stdout


def test_hwlm_chat_against_the_server(server: str, llm: Any, tmp_path: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = llm.chat(MESSAGES, params, use_tqdm=False)[0].outputs[0].text
    result = subprocess.run(
        [sys.executable, "-m", "hwlm.cli", "chat", "--url", server, "--temperature", "0",
         "--max-tokens", "6"],
        input="Hello!\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
