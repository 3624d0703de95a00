"""``hwlm serve --api-server-count 2``: two API processes on one port, one engine core.

Real servers in subprocesses: the processes exist under their titles; concurrent requests (new
connections, which the kernel spreads over both API processes) all get the answers a one-process
server gives; a killed engine turns every API process's /health to 503 and ends streams with an
error event; a killed API process stops everything; SIGTERM leaves no process behind.
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
from tests.test_server_engine_process import alive, children, server_pid

httpx = pytest.importorskip("httpx")

ARGS = ["hwlm-tiny", "--device", "cpu", "--api-server-count", "2"]
TITLES = ("hwlm::engine", "hwlm::api0", "hwlm::api1")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Any]]:
    folder = tmp_path_factory.mktemp("api2")
    with (
        ServerProcess(ARGS, folder / "two.log") as two,
        ServerProcess(ARGS[:3], folder / "one.log") as one,
    ):
        yield two, one


def test_one_engine_and_two_api_processes(servers: tuple[ServerProcess, Any]) -> None:
    two, _ = servers
    titles = children(server_pid(two))
    assert set(TITLES) <= set(titles), titles


def test_concurrent_answers_equal_one_api_process(servers: tuple[ServerProcess, Any]) -> None:
    two, one = servers
    bodies = [
        {"prompt": f"Tell me about {i}", "max_tokens": 12, "temperature": 0, "stream": i % 2 == 0}
        for i in range(16)
    ]

    def texts(url: str) -> list[str]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda b: _completion_text(url, b), bodies))

    assert texts(two.url) == texts(one.url)


def test_killed_engine_reaches_every_api_process(tmp_path: Path) -> None:
    server = ServerProcess(ARGS, tmp_path / "server.log").start()
    try:
        engine = children(server_pid(server))["hwlm::engine"]
        body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            os.kill(engine, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert any('"error"' in line and "engine" in line for line in rest), rest
        deadline = time.monotonic() + 5
        while True:  # new connections reach either API process: all must say 503
            codes = {httpx.get(f"{server.url}/health", timeout=2).status_code for _ in range(12)}
            if codes == {503}:
                break
            assert time.monotonic() < deadline, f"/health answers {codes}"
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait()


def test_killed_api_process_stops_everything(tmp_path: Path) -> None:
    server = ServerProcess(ARGS, tmp_path / "server.log").start()
    titles = children(server_pid(server))
    os.kill(titles["hwlm::api1"], signal.SIGKILL)
    assert server.wait(timeout=30) == 1, server.log.read_text()
    _wait_gone(titles.values())


def test_sigterm_stops_every_process(tmp_path: Path) -> None:
    server = ServerProcess(ARGS, tmp_path / "server.log").start()
    titles = children(server_pid(server))
    server.terminate()
    assert server.wait(timeout=30) == 0, server.log.read_text()
    _wait_gone(titles.values())


def test_count_needs_the_engine_process(tmp_path: Path) -> None:
    server = ServerProcess([*ARGS, "--no-engine-process"], tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="needs the engine in its own process"):
        server.start()


def _completion_text(url: str, body: dict[str, Any]) -> str:
    if not body["stream"]:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    import json

    return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)


def _wait_gone(pids: Any) -> None:
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "a process outlived the server"
        time.sleep(0.1)
