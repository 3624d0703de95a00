"""``hwlm serve``: the server over the engine core in its own process (the default).

Real servers in subprocesses: the engine process exists under its title, answers equal those of
the server with the engine on a thread (``--no-engine-process``), errors and /metrics read the same, a killed engine
turns /health to 503 and ends in-flight streams with an error event, and SIGTERM stops both
processes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability_servers import ServerProcess
from tests.server_helpers import parse_metrics, sse_events

httpx = pytest.importorskip("httpx")

BASE_ARGS = ["hwlm-tiny", "--device", "cpu"]
MP_ARGS = BASE_ARGS  # the default
THREAD_ARGS = [*BASE_ARGS, "--no-engine-process"]
ENGINE_TITLE = "hwlm::engine"


def children(pid: int) -> dict[str, int]:
    """The children of ``pid`` by process title (from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[cmdline.split(b"\0")[0].decode(errors="replace").strip()] = int(entry)
    return found


def engine_pids(server_pid: int) -> list[int]:
    """The children of ``server_pid`` titled ``hwlm::engine``."""
    return [pid for title, pid in children(server_pid).items() if title == ENGINE_TITLE]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def server_pid(server: ServerProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


@pytest.fixture(scope="module")
def mp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(MP_ARGS, tmp_path_factory.mktemp("mp") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def thread_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(THREAD_ARGS, tmp_path_factory.mktemp("thread") / "server.log") as server:
        yield server


def test_engine_runs_in_its_own_process(mp_server: ServerProcess) -> None:
    pids = engine_pids(server_pid(mp_server))
    assert len(pids) == 1
    assert Path(f"/proc/{pids[0]}/comm").read_text().strip() == ENGINE_TITLE[:15]


def test_greedy_completion_equals_default_server(
    mp_server: ServerProcess, thread_server: ServerProcess
) -> None:
    body = {"prompt": ["Hello there", "The sky"], "max_tokens": 12, "temperature": 0, "logprobs": 2}
    answers = [_post(s, "/v1/completions", body) for s in (mp_server, thread_server)]
    mp, thread = ({k: a[k] for k in ("choices", "usage")} for a in answers)
    assert mp == thread
    assert mp["usage"]["completion_tokens"] == 24


def test_streamed_chat_equals_default_server(
    mp_server: ServerProcess, thread_server: ServerProcess
) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    mp, thread = (_chat_stream(s, body) for s in (mp_server, thread_server))
    assert mp == thread
    assert mp[0]  # some text came


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "max_tokens": 4, "logprobs": 100000}, "logprobs"),
        ({"prompt": "Hi", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": [[10**9]], "max_tokens": 4}, "prompt"),
    ],
)
def test_bad_request_same_400(
    mp_server: ServerProcess, thread_server: ServerProcess, body: dict[str, Any], param: str
) -> None:
    answers = []
    for server in (mp_server, thread_server):
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        answers.append(r.json())
    assert answers[0] == answers[1]
    assert answers[0]["error"]["param"] == param


def test_metrics_names(mp_server: ServerProcess) -> None:
    _post(mp_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
    deadline = time.monotonic() + 5
    while True:  # the engine's stats travel as messages: wait for the request's
        samples = parse_metrics(httpx.get(f"{mp_server.url}/metrics", timeout=10).text)
        names = {name for name, _ in samples}
        if _value(samples, "hwlm:e2e_request_latency_seconds_count") >= 2:
            break
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)
    for name in (
        "hwlm:num_requests_running",
        "hwlm:num_requests_waiting",
        "hwlm:kv_cache_usage_perc",
        "hwlm:prompt_tokens_total",
        "hwlm:generation_tokens_total",
        "hwlm:prefix_cache_queries_total",
        "hwlm:prefix_cache_hits_total",
        "hwlm:num_preemptions_total",
        "hwlm:request_success_total",
        "hwlm:time_to_first_token_seconds_bucket",
        "hwlm:inter_token_latency_seconds_count",
    ):
        assert name in names, name
    assert _value(samples, "hwlm:generation_tokens_total") >= 5  # warm-up's 2, these 3


def test_killed_engine_gives_503_and_error_event(tmp_path: Path) -> None:
    server = ServerProcess(MP_ARGS, tmp_path / "server.log").start()
    try:
        (engine,) = engine_pids(server_pid(server))
        body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            os.kill(engine, signal.SIGKILL)
            _wait_health(server.url, 503, within=5)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert any('"error"' in line and "engine" in line for line in rest), rest
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"}, timeout=10)
        assert r.status_code == 503, r.text
    finally:
        server.terminate()
        server.wait()


def test_sigterm_stops_both_processes(tmp_path: Path) -> None:
    server = ServerProcess(MP_ARGS, tmp_path / "server.log").start()
    (engine,) = engine_pids(server_pid(server))
    server.terminate()
    assert server.wait() == 0, server.log.read_text()
    deadline = time.monotonic() + 10
    while alive(engine):
        assert time.monotonic() < deadline, "the engine process outlived the server"
        time.sleep(0.1)


# Helpers -------------------------------------------------------------------------------------


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _chat_stream(server: ServerProcess, body: dict[str, Any]) -> tuple[str, Any, Any]:
    """The streamed text, the finish reasons and the usage."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(c["delta"].get("content") or "" for e in chunks for c in e["choices"])
    reasons = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    return text, reasons, chunks[-1]["usage"]


def _wait_health(url: str, status: int, within: float) -> None:
    deadline = time.monotonic() + within
    while (code := httpx.get(f"{url}/health", timeout=2).status_code) != status:
        assert time.monotonic() < deadline, f"/health still answers {code}"
        time.sleep(0.1)


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)
