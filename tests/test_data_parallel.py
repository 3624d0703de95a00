"""``hwlm serve --data-parallel-size 2 --device cpu``: two engine cores behind one API process.

One real server for the module (its last test kills a core): the cores run under their titles
on disjoint CPU cores; completions and chat, streamed or not, equal ``LLM.generate`` /
``LLM.chat`` (greedy); concurrent requests reach both cores (per-core /metrics); a repeated
prefix stays on one core; a killed core fails its in-flight stream with an error event, turns
/health to 503 and refuses new requests with 503 while the other core finishes its own; the
other core exits once the API process is killed. With ``--api-server-count 2`` as well, both
API processes reach both cores and give the same answers, and SIGTERM leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.reliability_servers import ServerProcess
from tests.server_helpers import metric, parse_metrics, sse_events
from tests.test_server_engine_process import alive, children, server_pid

httpx = pytest.importorskip("httpx")

MODEL = "hwlm-tiny"
ARGS = [MODEL, "--device", "cpu", "--data-parallel-size", "2"]
TITLES = ("hwlm::engine0", "hwlm::engine1")
MESSAGES = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(ARGS, tmp_path_factory.mktemp("dp") / "server.log").start()
    try:
        yield server
    finally:  # the last test kills it; otherwise stop it here
        assert server.proc is not None
        if server.proc.poll() is None:
            server.terminate()
            assert server.wait(timeout=30) == 0, server.log.read_text()


@pytest.fixture(scope="module")
def llm() -> Any:
    from hwlm import LLM

    return LLM(MODEL, device="cpu")


def core_counts(url: str, name: str = "hwlm:engine_request_success_total") -> list[float]:
    samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    return [metric(samples, name, engine=str(i)) for i in range(2)]


def new_counts(url: str, before: list[float], total: int) -> list[float]:
    """Requests finished per core since ``before``, once ``total`` of them show (or after 10 s):
    /metrics shows each core's last stats, which lag the answers by up to a report interval."""
    deadline = time.monotonic() + 10
    while True:
        done = [after - b for after, b in zip(core_counts(url), before, strict=True)]
        if sum(done) >= total or time.monotonic() > deadline:
            return done
        time.sleep(0.1)


def test_two_engine_cores_on_their_own_cpus(server: ServerProcess) -> None:
    titles = children(server_pid(server))
    assert set(TITLES) <= set(titles), titles
    affinities = [os.sched_getaffinity(titles[t]) for t in TITLES]
    assert affinities[0] and affinities[1] and not affinities[0] & affinities[1]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_llm_generate(server: ServerProcess, llm: Any, stream: bool) -> None:
    from hwlm import SamplingParams

    prompts = [f"The story of number {i} is" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=10)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0, "stream": stream} for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda body: _text(server.url, "completions", body), bodies))
    assert texts == expected


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equal_llm_chat(server: ServerProcess, llm: Any, stream: bool) -> None:
    from hwlm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8)
    expected = llm.chat(MESSAGES, params, use_tqdm=False)[0].outputs[0].text
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": stream}
    assert _text(server.url, "chat/completions", body) == expected


def test_concurrent_requests_reach_both_cores(server: ServerProcess) -> None:
    before = core_counts(server.url)
    bodies = [
        {"prompt": f"Concurrent prompt {i}", "max_tokens": 24, "ignore_eos": True, "stream": i % 2}
        for i in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda body: _text(server.url, "completions", body), bodies))
    done = new_counts(server.url, before, 8)
    assert sum(done) == 8
    assert min(done) >= 2, done  # balanced by load: neither core took (nearly) all


def test_repeated_prefix_stays_on_one_core(server: ServerProcess) -> None:
    shared = "Background: " + " ".join(f"fact {i} is true." for i in range(30))
    before = core_counts(server.url)
    with httpx.Client(timeout=60) as client:
        for i in range(4):  # one at a time: idle cores would otherwise take turns
            body = {"prompt": f"{shared} Question {i}:", "max_tokens": 2}
            assert client.post(f"{server.url}/v1/completions", json=body).status_code == 200
    done = sorted(new_counts(server.url, before, 4))
    assert done == [0, 4]


def test_killed_core_fails_its_requests_only(server: ServerProcess) -> None:
    """Runs last: it leaves the module's server with a dead core."""
    engine0 = children(server_pid(server))["hwlm::engine0"]
    body = {"prompt": "Run long", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with (
        httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as first,
        httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as second,
    ):
        streams = [first.iter_lines(), second.iter_lines()]
        for lines in streams:  # both have started, one on each core (balanced by load)
            assert next(line for line in lines if line).startswith("data: {")
        deadline = time.monotonic() + 5  # the cores report their load every 0.1 s
        while core_counts(server.url, "hwlm:engine_num_requests_running") != [1, 1]:
            assert time.monotonic() < deadline, "the two streams are not on both cores"
            time.sleep(0.05)
        os.kill(engine0, signal.SIGKILL)
        rests = [[line for line in lines if line] for lines in streams]
    failed = [any('"error"' in line and "engine" in line for line in rest) for rest in rests]
    assert sorted(failed) == [False, True], rests  # the other core's stream finished
    assert all(rest[-1] == "data: [DONE]" for rest in rests)
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/health", timeout=2).status_code != 503:
        assert time.monotonic() < deadline, "/health still answers 200"
        time.sleep(0.1)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"}, timeout=10)
    assert r.status_code == 503, r.text
    survivor = children(server_pid(server))["hwlm::engine1"]
    os.kill(server_pid(server), signal.SIGKILL)  # the API process dies: no core may outlive it
    server.wait()
    deadline = time.monotonic() + 10
    while alive(survivor):
        assert time.monotonic() < deadline, "the surviving core outlived the API process"
        time.sleep(0.1)


def test_two_api_processes_reach_both_cores(tmp_path: Path, llm: Any) -> None:
    from hwlm import SamplingParams

    prompts = [f"Tell me about {i}" for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    bodies = [
        {"prompt": p, "max_tokens": 6, "temperature": 0, "stream": i % 2 == 0}
        for i, p in enumerate(prompts)
    ]
    args = [*ARGS, "--api-server-count", "2"]
    with ServerProcess(args, tmp_path / "server.log") as server:
        titles = children(server_pid(server))
        assert {*TITLES, "hwlm::api0", "hwlm::api1"} <= set(titles), titles
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda body: _text(server.url, "completions", body), bodies))
        assert texts == expected
        # warm-up's and these, on both cores; /metrics shows the cores' last stats, which lag the
        # answers (an API process hears from each core every 0.1 s at most, and may not have yet)
        deadline = time.monotonic() + 10
        while min(counts := core_counts(server.url)) < 2:
            assert time.monotonic() < deadline, f"requests per core: {counts}"
            time.sleep(0.1)
    for title in (*TITLES, "hwlm::api0", "hwlm::api1"):
        assert not alive(titles[title]), f"{title} outlived SIGTERM"


def test_a_core_that_cannot_start_is_one_error_naming_it() -> None:
    import multiprocessing

    from hwlm.engine.dp_client import DataParallelEngineClient
    from hwlm.engine_args import EngineArgs

    args = EngineArgs("no-such-model-anywhere", device="cpu")
    with pytest.raises(ValueError, match=r"^engine core 0 of 2: .*no-such-model-anywhere") as info:
        DataParallelEngineClient.start(args, 2, start_timeout=120)
    assert "\n" not in str(info.value)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("hwlm::")]


def _text(url: str, route: str, body: dict[str, Any]) -> str:
    chat = route.startswith("chat")
    if not body.get("stream"):
        r = httpx.post(f"{url}/v1/{route}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return str(choice["message"]["content"] if chat else choice["text"])
    with httpx.stream("POST", f"{url}/v1/{route}", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0] for e in events[:-1] if e["choices"]]
    return "".join((p["delta"].get("content") or "") if chat else p["text"] for p in pieces)
