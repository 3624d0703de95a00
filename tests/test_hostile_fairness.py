"""Fair sharing, against a real ``python -m hwlm.server`` on 127.0.0.1 (hwlm-tiny, CPU): while
one client's 1,024-sequence request streams (64 prompts x n 16, up to 2,040 tokens each, EOS
ignored), another client's 4-token request completes within 2 s, and the big stream keeps going
(its longest gap between events is reported, and bounded).

Without the scheduler's share rule the small request waits for the big one to leave (22 s in the
issue's run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.reliability_servers import ServerProcess  # noqa: E402

BIG = {"prompt": ["hi"] * 64, "n": 16, "max_tokens": 2040, "ignore_eos": True, "stream": True}
SMALL = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}
SMALL_LATENCY_S = 2.0


@pytest.fixture(scope="module")
def server(device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("fairness") / "server.log"
    with ServerProcess(["hwlm-tiny", "--device", device], log) as process:
        yield process


class _BigStream:
    """Streams BIG on a thread; records when each event arrived."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.stop = threading.Event()
        self.status = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{self.url}/v1/completions", json=BIG) as r,
        ):
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.times.append(time.monotonic())
                if self.stop.is_set():
                    return  # leaving aborts the request


def test_a_small_request_is_served_while_a_1024_sequence_request_runs(
    server: ServerProcess,
) -> None:
    big = _BigStream(server.url)
    big.thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(big.times) < 2000:  # every sequence is decoding
            assert time.monotonic() < deadline, "the big request did not start"
            assert big.thread.is_alive() or big.times, big.status
            time.sleep(0.05)
        latencies = []
        for _ in range(3):
            start = time.monotonic()
            r = httpx.post(f"{server.url}/v1/completions", json=SMALL, timeout=15)
            latencies.append(time.monotonic() - start)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
        seen = len(big.times)
        time.sleep(1.0)
        assert len(big.times) > seen, "the big stream stalled after the small requests"
        window = [t for t in big.times if t >= big.times[0] + 0.5]
        gap = max(b - a for a, b in zip(window, window[1:], strict=False))
        print(
            f"small request latencies {[round(x, 2) for x in latencies]} s; "
            f"big stream's longest gap {gap:.2f} s over {len(big.times)} events"
        )
        # Each of the small request's ~5 steps also computes the big request's 1,024 decodes:
        # the median is the target; any one may take longer on a busy machine (without the
        # share rule it waits for the big request to end: over a minute).
        assert sorted(latencies)[1] < SMALL_LATENCY_S, latencies
        assert max(latencies) < 3 * SMALL_LATENCY_S, latencies
    finally:
        big.stop.set()
        big.thread.join(30)
