"""``hwlm serve --tensor-parallel-size 2 --device cpu``: the engine process is rank 0 and starts
one worker; requests are served, and a killed worker ends the in-flight stream with an error
event, turns /health to 503 and leaves no process behind, also when it dies while the server is
idle."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.reliability_servers import ServerProcess
from tests.test_server_engine_process import alive, children, engine_pids

httpx = pytest.importorskip("httpx")

ARGS = ["hwlm-tiny", "--device", "cpu", "--tensor-parallel-size", "2", "--max-model-len", "512"]
WORKER_TITLE = "hwlm::tp-worker-1"


def test_serves_then_a_killed_worker_ends_cleanly(tmp_path: Path) -> None:
    server = ServerProcess(ARGS, tmp_path / "server.log").start()  # waits for a first request
    try:
        assert server.proc is not None
        (engine,) = engine_pids(server.proc.pid)
        worker = children(engine)[WORKER_TITLE]
        body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5

        body = {"prompt": "Hello", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            os.kill(worker, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert any('"error"' in line for line in rest), rest[-3:]
        _wait_health(server.url, 503, within=10)
        deadline = time.monotonic() + 15
        while alive(engine) or alive(worker):
            assert time.monotonic() < deadline, "the engine or the worker outlived the failure"
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait()


def test_a_worker_killed_while_idle_is_noticed_without_a_request(tmp_path: Path) -> None:
    """No request in flight: the engine core's idle loop checks its workers, so /health turns
    503 within a few seconds and no process is left."""
    server = ServerProcess(ARGS, tmp_path / "server.log").start()
    try:
        assert server.proc is not None
        (engine,) = engine_pids(server.proc.pid)
        worker = children(engine)[WORKER_TITLE]
        _wait_health(server.url, 200, within=10)
        os.kill(worker, signal.SIGKILL)
        _wait_health(server.url, 503, within=10)
        deadline = time.monotonic() + 15
        while alive(engine):
            assert time.monotonic() < deadline, "the engine outlived its worker"
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait()


def _wait_health(url: str, status: int, within: float) -> None:
    deadline = time.monotonic() + within
    while (code := httpx.get(f"{url}/health", timeout=2).status_code) != status:
        assert time.monotonic() < deadline, f"/health still answers {code}"
        time.sleep(0.1)
