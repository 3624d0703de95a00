"""Helpers for the server tests: start a real ``python -m hwlm.server`` process on 127.0.0.1,
read server-sent events, and parse Prometheus' text format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    base_url: str, proc: subprocess.Popen[bytes] | None, log: Path | None, headers: Any = None
) -> None:
    """Wait for /health, then run one small request: the first one may JIT-compile kernels."""
    deadline = time.monotonic() + 90
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text() if log else ''}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not become healthy")
        time.sleep(0.2)
    body = {"prompt": "warm up", "max_tokens": 2}
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text


@contextlib.contextmanager
def server_process(
    args: list[str], log: Path, headers: Any = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``python -m hwlm.server ARGS --host 127.0.0.1 --port P``; yield its base URL. On exit
    it is stopped with SIGTERM and must exit 0."""
    port = free_port()
    argv = [sys.executable, "-m", "hwlm.server", *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, proc, log, headers)
        yield base_url
    finally:
        proc.terminate()  # SIGTERM: a clean shutdown
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, log.read_text()


def sse_events(response: Any) -> list[Any]:
    """The JSON payloads of an SSE response, then "[DONE]" as the last item."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus text page: (name, labels) -> value. Fails on malformed lines."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert not line or re.match(r"^# (HELP|TYPE) \S+ .+$", line), line
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]


def wait_idle(engine: Any, timeout: float = 10) -> None:
    """Until an AsyncLLMEngine has no request running, waiting or tracked and every KV block is
    free; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = asyncio.run(engine.get_stats())
        idle = stats.num_running == stats.num_waiting == stats.num_streams == 0
        if idle and stats.num_free_blocks == stats.num_blocks:
            return
        assert time.monotonic() < deadline, f"the engine did not go idle: {stats}"
        time.sleep(0.02)
