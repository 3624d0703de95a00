"""``hwlm bench serve`` against the stand-in server: client processes, vLLM's datasets, schedule
and result fields, and one-line errors for bad flag values."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from hwlm.bench import client as client_module  # noqa: E402
from hwlm.bench.client import RequestResult  # noqa: E402
from hwlm.bench.datasets import length_range  # noqa: E402
from hwlm.bench.dispatch import arrival_times  # noqa: E402
from hwlm.bench.hf_baselines import make_prompts  # noqa: E402
from hwlm.bench.load import BenchConfig, build_requests, run_benchmark  # noqa: E402
from hwlm.bench.metrics import vllm_metrics  # noqa: E402
from hwlm.bench.standin import StandinServer, StandinSettings  # noqa: E402
from hwlm.cli.main import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_FIELDS = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl") for s in ("mean", "median", "p99")]


@pytest.fixture(scope="module")
def standin() -> Iterator[str]:
    with StandinServer(processes=2) as url:
        yield url


@pytest.fixture(scope="module")
def slow_standin() -> Iterator[str]:
    """Tokens 2 ms apart: requests overlap long enough to count them."""
    with StandinServer(processes=1, settings=StandinSettings(token_interval_s=0.002)) as url:
        yield url


def _bench(url: str, *flags: str, out: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "hwlm.cli", "bench", "serve", "--base-url", url]
    argv += ["--save-result", "--result-filename", str(out), *flags]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_client_processes_read_the_same_requests_and_tokens(standin: str, tmp_path: Path) -> None:
    flags = ["--dataset-name", "random", "--tokenizer", "c1-llama", "--num-prompts", "48"]
    flags += [
        "--random-input-len",
        "40",
        "--random-output-len",
        "32",
        "--random-range-ratio",
        "0.5",
    ]
    one = _bench(standin, *flags, out=tmp_path / "one.json")
    two = _bench(standin, *flags, "--client-processes", "2", out=tmp_path / "two.json")
    for key in ("completed", "failed", "total_input_tokens", "total_output_tokens"):
        assert one[key] == two[key], key
    assert one["completed"] == 48 and one["failed"] == 0
    assert sorted(one["output_lens"]) == sorted(two["output_lens"])
    low, high = length_range(32, 0.5)
    assert all(low <= n <= high for n in one["output_lens"]) and low < high
    assert two["client_processes"] == 2


def test_saved_result_has_vllm_fields_and_the_ceiling(standin: str, tmp_path: Path) -> None:
    flags = ["--num-prompts", "16", "--output-len", "8", "--measure-ceiling"]
    flags += ["--ceiling-server-processes", "1", "--metric-percentiles", "50,99,99.9"]
    flags += ["--percentile-metrics", "ttft,tpot,itl,e2el"]
    result = _bench(standin, *flags, out=tmp_path / "r.json")
    for key in [*VLLM_FIELDS, "p99.9_ttft_ms", "p50_e2el_ms", "std_itl_ms"]:
        assert key in result, key
    assert result["total_output_tokens"] == 16 * 8 and result["request_rate"] == "inf"
    assert result["ceiling_output_throughput"] > 0
    assert len(result["itls"]) == 16 and all(len(gaps) == 7 for gaps in result["itls"])
    assert all(text.startswith(" the quick brown") for text in result["generated_texts"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--request-rate", "-1"], "--request-rate must be > 0"),
        (["--request-rate", "0"], "--request-rate must be > 0"),
        (["--client-processes", "0"], "--client-processes must be at least 1"),
        (["--random-range-ratio", "1"], "--random-range-ratio must be in [0, 1)"),
        (["--random-range-ratio", "-0.1"], "--random-range-ratio must be in [0, 1)"),
        (["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
        (["--burstiness", "0"], "--burstiness must be > 0"),
        (["--num-prompts", "0"], "--num-prompts must be at least 1"),
        (["--endpoint", "/v1/embeddings"], "--endpoint must be one of"),
        (["--percentile-metrics", "ttft,latency"], "--percentile-metrics: unknown"),
        (["--metric-percentiles", "0"], "--metric-percentiles must be numbers in (0, 100]"),
        (["--random-input-range", "10", "5"], "--random-input-range needs 1 <= MIN <= MAX"),
        (["--base-url", "http://127.0.0.1:9"], "server not reachable at http://127.0.0.1:9"),
    ],
)
def test_bad_values_are_one_line_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "serve", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_aiohttp_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    with pytest.raises(ValueError, match="needs aiohttp") as info:
        client_module.import_aiohttp()
    assert "\n" not in str(info.value)


def test_concurrency_limit_holds_across_processes(slow_standin: str) -> None:
    config = BenchConfig(slow_standin, model="standin", num_prompts=12, output_len=20)
    config.max_concurrency, config.client_processes = 3, 2
    result = asyncio.run(run_benchmark(config))
    assert [r.ok for r in result.results] == [True] * 12
    assert _most_in_flight(result.results) == 3


def test_aborts_and_chat_across_processes(standin: str) -> None:
    config = BenchConfig(standin, model="standin", num_prompts=40, output_len=16)
    config.abort_fraction, config.client_processes = 0.25, 2
    config.endpoint = client_module.CHAT_ENDPOINT
    result = asyncio.run(run_benchmark(config))
    assert sum(r.aborted for r in result.results) == 10
    done = [r for r in result.results if r.ok]
    assert len(done) == 30 and all(r.output_tokens == 16 for r in done)
    assert all(r.finish_reason == "length" and r.text.startswith(" the quick") for r in done)
    assert all(len(r.itl_s) == 15 for r in done)  # the role chunk is no content


def test_random_dataset_is_bench_throughputs_prompts() -> None:
    config = BenchConfig("x", num_prompts=20, dataset="random", random_input_range=(100, 1024))
    config.random_output_len, config.seed = 256, 3
    requests = build_requests(config, "qwen2.5-0.5b")
    assert [r.prompt for r in requests] == make_prompts(20, 100, 1024, 151936, seed=3)
    assert all(r.prompt_len == len(r.prompt) and r.output_len == 256 for r in requests)
    ranged = BenchConfig("x", num_prompts=200, dataset="random", random_input_len=100)
    ranged.random_output_len, ranged.random_range_ratio = 10, 0.5
    lens = [(r.prompt_len, r.output_len) for r in build_requests(ranged, "c1-llama")]
    assert {n for n, _ in lens} <= set(range(50, 151)) and {m for _, m in lens} == set(range(5, 16))


def test_arrivals_follow_rate_and_burstiness() -> None:
    assert arrival_times(5, float("inf"), 1.0, seed=0) == [0.0] * 5
    poisson = arrival_times(4001, 50.0, 1.0, seed=0)
    assert poisson[0] == 0.0 and poisson == arrival_times(4001, 50.0, 1.0, seed=0)
    assert poisson[-1] / 4000 == pytest.approx(1 / 50, rel=0.05)
    bursty = arrival_times(4001, 50.0, 0.25, seed=0)
    assert bursty[-1] / 4000 == pytest.approx(1 / 50, rel=0.1)
    gaps = [b - a for a, b in zip(bursty, bursty[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    assert sum((g - mean) ** 2 for g in gaps) / len(gaps) > 2 * mean**2  # gamma(0.25): cv^2 = 4


def test_metrics_follow_vllm_definitions() -> None:
    r = RequestResult(0, prompt_len=10, output_tokens=5, ttft_s=0.1, latency_s=0.5)
    r.itl_s = [0.1, 0.1, 0.1, 0.1]
    failed = RequestResult(1, prompt_len=10, error="HTTP 500")
    m = vllm_metrics([r, failed], 2.0, metrics=("ttft", "tpot", "e2el"), percentiles=(50, 99.9))
    assert m["completed"] == 1 and m["failed"] == 1 and m["total_input_tokens"] == 10
    assert m["output_throughput"] == 2.5 and m["total_token_throughput"] == 7.5
    assert m["mean_tpot_ms"] == pytest.approx(100.0) and m["p99.9_ttft_ms"] == pytest.approx(100)
    assert m["median_e2el_ms"] == pytest.approx(500.0) and "mean_itl_ms" not in m


def _most_in_flight(results: list[RequestResult]) -> int:
    events = sorted(
        [(r.sent_at, 1) for r in results] + [(r.sent_at + r.latency_s, -1) for r in results]
    )
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most
