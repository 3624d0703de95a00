"""Faults, against real uvicorn servers on 127.0.0.1:

* an exception while processing one request's output (an injected detokenizer failure) fails that
  request with a 500 error body while concurrent requests finish correctly;
* a dead engine loop: /health answers 503 and waiting clients get an error, not a hang;
* SIGTERM drains: in-flight requests finish, new connections are refused, exit 0; a request
  longer than --shutdown-timeout is cut off at the deadline and the process still exits 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hwlm.sampling_params import SamplingParams  # noqa: E402
from tests.reliability_servers import ServerProcess  # noqa: E402
from tests.server_helpers import wait_idle  # noqa: E402
from tests.test_reliability_load import _serve, _wait_for  # noqa: E402

POISON = "poison pill"


class ExplodingDetokenizer:
    """Stands in for a request's IncrementalDetokenizer; fails on its second token."""

    text = ""

    def __init__(self) -> None:
        self.calls = 0

    def add(self, token_id: int) -> str:
        self.calls += 1
        if self.calls >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected by the test")
        return ""


def _poison_requests(llm_engine: Any) -> None:
    """Requests whose prompt contains POISON get a detokenizer that fails mid-generation."""
    add = llm_engine.add_request

    def add_request(
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        stream: bool = False,
        priority: int = 0,
        group: str | None = None,
    ) -> None:
        add(request_id, prompt, params, stream, priority=priority, group=group)
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if isinstance(text, str) and POISON in text:
            for seq in llm_engine._requests[request_id]:
                seq.detokenizer = ExplodingDetokenizer()

    llm_engine.add_request = add_request


def _sse(response: Any) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_one_failing_request_gets_500_and_the_others_finish(device: str) -> None:
    from tests.test_reliability_load import _greedy

    good = ["the first of them", "and then the second"]
    expected = _greedy(device, good, 40)
    body = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with _serve(device, max_num_seqs=8, num_kv_blocks=64) as (url, engine):
        _poison_requests(engine.engine)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            goods = [
                pool.submit(httpx.post, f"{url}/v1/completions", json={**body, "prompt": p})
                for p in good
            ]
            bad = pool.submit(httpx.post, f"{url}/v1/completions", json={**body, "prompt": POISON})
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={**body, "prompt": POISON, "stream": True}
            ) as response:
                events = _sse(response)
            r = bad.result(timeout=30)
            assert r.status_code == 500, r.text
            assert r.json()["error"]["type"] == "server_error"
            for future, text in zip(goods, expected, strict=True):
                ok = future.result(timeout=30)
                assert ok.status_code == 200, ok.text
                assert ok.json()["choices"][0]["text"] == text
        assert events[-1] == "[DONE]"
        assert "error" in events[-2] and events[-2]["error"]["type"] == "server_error"
        assert engine.is_healthy() and httpx.get(f"{url}/health").status_code == 200
        wait_idle(engine)


def test_offline_generate_still_raises_a_request_failure(device: str) -> None:
    """Isolation is the server's: LLM.generate (isolation off) reports the failure as before."""
    from hwlm import LLM

    llm = LLM("hwlm-tiny", device=device, max_model_len=128, num_kv_blocks=16)
    _poison_requests(llm.engine)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(UnicodeDecodeError, match="injected"):
        llm.generate([POISON], params, use_tqdm=False)


def test_dead_engine_loop_gives_503_and_errors_not_hangs(device: str) -> None:
    with _serve(device, max_num_seqs=8, num_kv_blocks=64) as (url, engine):
        llm_engine = engine.engine
        step, broken = llm_engine.step, threading.Event()

        def failing_step() -> Any:
            if broken.is_set():
                raise RuntimeError("injected: the engine loop dies")
            return step()

        llm_engine.step = failing_step
        long = {"prompt": "go on", "max_tokens": 240, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=30)
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=30
            ) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                broken.set()
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][len("data: ") :])["error"]["message"]
            r = waiting.result(timeout=30)
            assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 503, r.text


def _stream_in_thread(
    url: str, body: dict[str, Any], started: threading.Event, times: list[float]
) -> Any:
    """Stream a completion; set ``started`` at its first event and append each event's arrival
    time to ``times``; return (events, error)."""
    events: list[Any] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
                    times.append(time.monotonic())
                    started.set()
    except httpx.TransportError as exc:
        return events, exc
    finally:
        started.set()
    return events, None


@contextlib.contextmanager
def _streaming(
    device: str, tmp_path: Path, kv_blocks: int, shutdown_timeout: int, body: dict[str, Any]
) -> Iterator[tuple[ServerProcess, concurrent.futures.Future, list[float]]]:
    """A server with ``--shutdown-timeout``, and one streamed completion of ``body`` running in
    a thread (its first event already received); yields the server, the stream's future (events,
    transport error) and the arrival times of its events."""
    args = ["hwlm-tiny", "--device", device, "--num-kv-blocks", str(kv_blocks)]
    args += ["--shutdown-timeout", str(shutdown_timeout)]
    server = ServerProcess(args, tmp_path / "server.log").start()
    started, times = threading.Event(), []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            _stream_in_thread, server.url, {**body, "stream": True}, started, times
        )
        assert started.wait(30)
        yield server, future, times


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    device: str, tmp_path: Path
) -> None:
    body = {"prompt": "drain me", "max_tokens": 300, "ignore_eos": True}
    with _streaming(device, tmp_path, 64, 30, body) as (server, future, times):
        server.terminate()
        _wait_for(lambda: _refused(server.url), timeout=10)
        refused_at = time.monotonic()
        events, error = future.result(timeout=60)
    assert error is None, error
    assert times[-1] > refused_at, "the stream ended before the server refused new requests"
    assert events[-1] == "[DONE]"
    texts = [e for e in events[:-1] if e["choices"]]
    assert texts[-1]["choices"][0]["finish_reason"] == "length"
    assert server.wait(timeout=30) == 0, server.log.read_text()


def test_sigterm_cuts_off_requests_longer_than_the_grace_period(
    device: str, tmp_path: Path
) -> None:
    body = {"prompt": "never ends", "max_tokens": 2000, "ignore_eos": True}
    with _streaming(device, tmp_path, 160, 1, body) as (server, future, _):
        begin = time.monotonic()
        server.terminate()
        assert server.wait(timeout=15) == 0, server.log.read_text()
        events, _ = future.result(timeout=15)
    assert time.monotonic() - begin < 10
    assert not any(
        e != "[DONE]" and e["choices"] and e["choices"][0]["finish_reason"] for e in events
    )


def _refused(url: str) -> bool:
    """True once the server stops accepting: connection refused, or 503 while it drains."""
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
    except httpx.TransportError:
        return True
    return r.status_code == 503
