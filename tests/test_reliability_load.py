"""Load and overload against real uvicorn servers on 127.0.0.1.

* ``hwlm bench serve``'s machinery sends 200 streamed requests from 64 concurrent clients to a
  server process, a quarter abandoned mid-stream, three rounds: every other request completes with
  the greedy output of ``LLM.generate``; after each round /metrics shows no request left and KV
  usage 0 (every block free); the server's resident memory is stable across the rounds.
* KV exhaustion (a cache far too small for the batch) preempts and resumes: all outputs correct.
* A full waiting queue answers 503 with Retry-After; queued requests still complete.

The last two serve from a thread of this process, so that the test can read the engine itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from hwlm.bench.serve import (  # noqa: E402
    BenchConfig,
    _percentile_ms,
    abort_plan,
    random_prompts,
    run_benchmark,
)
from hwlm.sampling_params import SamplingParams  # noqa: E402
from hwlm.server.admission import ServerLimits  # noqa: E402
from hwlm.server.async_engine import AsyncLLMEngine  # noqa: E402
from tests.reliability_servers import ServerProcess, ThreadedServer  # noqa: E402
from tests.server_helpers import ROOT, metric, parse_metrics, wait_idle  # noqa: E402

MAX_MODEL_LEN = 256
LOAD = dict(num_prompts=200, max_concurrency=64, abort_fraction=0.25, input_len=12, output_len=8)
# The server's resident memory may grow by at most this much from the end of round 1 to the end
# of round 3 (round 1 warms allocator pools, JIT caches and connection buffers).
RSS_TOLERANCE = 16 * 2**20
WARM_ROUNDS = 12


def _serve(device: str, limits: ServerLimits | None = None, **engine_args: Any) -> Any:
    """A context manager: (base_url, AsyncLLMEngine) for a fresh hwlm-tiny engine."""
    from hwlm.engine.llm_engine import EngineArgs, LLMEngine
    from hwlm.server.api import build_app

    @contextmanager
    def serving() -> Iterator[tuple[str, AsyncLLMEngine]]:
        args = EngineArgs("hwlm-tiny", device=device, max_model_len=MAX_MODEL_LEN, **engine_args)
        engine = AsyncLLMEngine(LLMEngine(args))
        try:
            with ThreadedServer(build_app(engine, "hwlm-tiny", None, limits)) as url:
                yield url, engine
        finally:
            engine.shutdown()

    return serving()


def _greedy(device: str, prompts: list[str], max_tokens: int) -> list[str]:
    from hwlm import LLM

    llm = LLM("hwlm-tiny", device=device, max_model_len=MAX_MODEL_LEN, num_kv_blocks=512)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


@contextmanager
def _cpu_dense_path(onednn: bool) -> Iterator[None]:
    """Run the CPU backend's dense layers through oneDNN or torch's default (HWLM_CPU_ONEDNN),
    in this process and in servers started meanwhile."""
    from hwlm.backends.cpu_linear import onednn_usable

    saved = os.environ.get("HWLM_CPU_ONEDNN")
    os.environ["HWLM_CPU_ONEDNN"] = "1" if onednn else "0"
    onednn_usable.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HWLM_CPU_ONEDNN"]
        else:
            os.environ["HWLM_CPU_ONEDNN"] = saved
        onednn_usable.cache_clear()


def _wait_metrics_idle(url: str, timeout: float = 10) -> None:
    """Until /metrics shows no running or waiting request and KV usage 0 (every block free)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = parse_metrics(httpx.get(f"{url}/metrics").text)
        values = [
            metric(samples, name)
            for name in (
                "hwlm:num_requests_running",
                "hwlm:num_requests_waiting",
                "hwlm:kv_cache_usage_perc",
            )
        ]
        if values == [0, 0, 0]:
            return
        assert time.monotonic() < deadline, f"the server did not go idle: {values}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def load_server(device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server process on the CPU backend's default dense path (oneDNN); the reference runs
    the same path."""
    if device != "cpu":
        pytest.skip("runs on the CPU backend")
    args = ["hwlm-tiny", "--device", device, "--max-model-len", str(MAX_MODEL_LEN)]
    args += ["--max-num-seqs", "64", "--num-kv-blocks", "256"]
    log = tmp_path_factory.mktemp("load") / "server.log"
    with _cpu_dense_path(onednn=True), ServerProcess(args, log) as server:
        yield server


def test_load_with_aborts_is_correct_frees_every_block_and_keeps_memory_flat(
    device: str, load_server: ServerProcess
) -> None:
    config = dict(LOAD)
    prompts = random_prompts(config["num_prompts"], config["input_len"], seed=0)
    with _cpu_dense_path(onednn=True):
        expected = _greedy(device, prompts, config["output_len"])
    assert load_server.proc is not None
    process = psutil.Process(load_server.proc.pid)
    rss: list[int] = []
    # oneDNN keeps a kernel per batch shape it meets (a bounded set: backends/cpu_linear.py), so
    # memory rises over the first rounds and then levels off; how soon depends on which batch
    # shapes the rounds happen to meet (measured, 2026-12-03: 516, 538, 553, 555, 572, 577, 573,
    # 580, 590, 593, 596, 598, 599, 599, 599, 601, 598 MiB). The last three rounds must stay flat.
    for _ in range(WARM_ROUNDS + 3):
        bench = BenchConfig(base_url=load_server.url, seed=0, **config)
        result = asyncio.run(run_benchmark(bench))
        _check_round(result.results, expected, config["output_len"])
        _wait_metrics_idle(load_server.url)
        rss.append(process.memory_info().rss)
    assert httpx.get(f"{load_server.url}/health").status_code == 200
    rss = rss[WARM_ROUNDS:]
    growth = rss[2] - rss[0]
    assert growth < RSS_TOLERANCE, f"resident memory grew {growth / 2**20:.1f} MiB: {rss}"


def test_bench_serve_command(load_server: ServerProcess, tmp_path: Path) -> None:
    """``hwlm bench serve`` at a Poisson rate with aborts: the report and its JSON."""
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "hwlm.cli", "bench", "serve", "--base-url", load_server.url]
    argv += ["--num-prompts", "24", "--request-rate", "200", "--max-concurrency", "8"]
    argv += ["--abort-fraction", "0.25", "--output-len", "8", "--output-json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for key in (
        "median_ttft_ms",
        "p99_ttft_ms",
        "median_itl_ms",
        "p99_itl_ms",
        "output_throughput",
    ):
        assert key in done.stdout
    summary = json.loads(out.read_text())
    assert summary["failed"] == 0 and 4 <= summary["aborted"] <= 6
    assert summary["completed"] + summary["aborted"] == 24
    assert summary["total_output_tokens"] == 8 * summary["completed"]
    assert summary["ttft_ms_p50"] <= summary["ttft_ms_p99"]
    assert summary["itl_ms_p50"] <= summary["itl_ms_p99"] and summary["output_throughput"] > 0
    _wait_metrics_idle(load_server.url)


def test_bench_prompts_and_aborts_are_seeded() -> None:
    assert random_prompts(5, 7, seed=1) == random_prompts(5, 7, seed=1)
    assert random_prompts(5, 7, seed=1) != random_prompts(5, 7, seed=2)
    assert all(len(p.split()) == 7 for p in random_prompts(5, 7, seed=1))
    config = BenchConfig(base_url="x", num_prompts=40, abort_fraction=0.25, output_len=8)
    plan = abort_plan(config)
    assert len(plan) == 10 and plan == abort_plan(config)
    assert all(1 <= after <= 2 for after in plan.values())
    assert _percentile_ms([0.003, 0.001, 0.002], 50) == pytest.approx(2.0)
    assert _percentile_ms([0.0, 0.1], 99) == pytest.approx(99.0)
    assert _percentile_ms([], 50) is None


def _check_round(results: list[Any], expected: list[str], output_len: int) -> None:
    failed = [r.error for r in results if r.error]
    assert not failed, failed[:3]
    # 50 are planned; a stream that ends before its abort point completes instead.
    assert 40 <= sum(r.aborted for r in results) <= 50
    for r in results:
        if r.ok:
            assert r.text == expected[r.index], f"request {r.index}"
            assert r.output_tokens == output_len and r.finish_reason == "length"


def test_kv_exhaustion_preempts_and_resumes(device: str) -> None:
    prompts = random_prompts(8, 12, seed=3)
    expected = _greedy(device, prompts, 48)
    # 8 sequences of ~64 tokens need ~32 blocks of 16; the cache has 10.
    with _serve(device, max_num_seqs=8, num_kv_blocks=10) as (url, engine):
        body = {"max_tokens": 48, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(
                    httpx.post, f"{url}/v1/completions", json={**body, "prompt": p}, timeout=60
                )
                for p in prompts
            ]
            responses = [f.result() for f in futures]
        for response, text in zip(responses, expected, strict=True):
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == text
        stats = asyncio.run(engine.get_stats())
        assert stats.num_preemptions > 0, "the test did not exhaust the KV cache"
        wait_idle(engine)
        assert engine.is_healthy()


def test_full_waiting_queue_gets_503_with_retry_after(device: str) -> None:
    limits = ServerLimits(max_waiting_requests=2)
    long = {"prompt": "a long one", "max_tokens": 200, "ignore_eos": True}
    with _serve(device, limits, max_num_seqs=1, num_kv_blocks=64) as (url, engine):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=60)]
            _wait_for(lambda: asyncio.run(engine.get_stats()).num_running == 1)
            futures += [
                pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=60)
                for _ in range(2)
            ]
            _wait_for(lambda: engine.num_waiting_sequences() == 2)
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"].isdigit()
            assert r.json()["error"]["code"] == "server_overloaded"
            assert all(f.result().status_code == 200 for f in futures)
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        wait_idle(engine)


def test_waiting_queue_counts_sequences(device: str) -> None:
    """A waiting request with n 3 counts 3 against --max-waiting-requests: with one running and
    one such request waiting (3 of a bound of 4), a 2-sample request is refused, a 1-sample one
    is not."""
    limits = ServerLimits(max_waiting_requests=4)
    long = {"prompt": "a long one", "max_tokens": 200, "ignore_eos": True}
    with _serve(device, limits, max_num_seqs=1, num_kv_blocks=64) as (url, engine):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=60)]
            _wait_for(lambda: asyncio.run(engine.get_stats()).num_running == 1)
            sampled = {**long, "n": 3, "temperature": 1.0}
            futures.append(
                pool.submit(httpx.post, f"{url}/v1/completions", json=sampled, timeout=60)
            )
            _wait_for(lambda: engine.num_waiting_sequences() == 3)
            two = {"prompt": "hi", "max_tokens": 2, "n": 2, "temperature": 1.0}
            refused = httpx.post(f"{url}/v1/completions", json=two)
            assert refused.status_code == 503, refused.text
            one = pool.submit(
                httpx.post, f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}
            )
            assert one.result().status_code == 200
            assert all(f.result().status_code == 200 for f in futures)
        wait_idle(engine)


def _wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
