"""Serving metrics: histograms, the Prometheus page, and what AsyncLLMEngine records."""

from __future__ import annotations

import asyncio

import pytest

from hwlm.sampling_params import SamplingParams
from hwlm.server.async_engine import AsyncLLMEngine, EngineStats
from hwlm.server.metrics import Histogram, ServingMetrics
from hwlm.server.prometheus import render_metrics
from tests.server_helpers import metric, parse_metrics
from tests.test_server import FakeEngine


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    assert hist.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert hist.count == 4 and hist.sum == pytest.approx(3.65)


def test_request_timings() -> None:
    m = ServingMetrics()
    m.on_added("a", arrival=10.0)
    m.on_tokens("a", 1, 5, now=10.5)  # first token: TTFT 0.5, prompt counted once
    m.on_tokens("a", 1, 5, now=10.6)  # no new token: nothing observed
    m.on_tokens("a", 3, 5, now=10.7)  # two more tokens in one step: one interval
    m.on_finished("a", "length", now=11.0)
    m.on_added("b", arrival=10.0)
    m.on_aborted("b")
    m.on_aborted("b")  # twice: counted once
    snap = m.snapshot()
    assert (snap.prompt_tokens, snap.generation_tokens) == (5, 3)
    assert snap.ttft.count == 1 and snap.ttft.sum == pytest.approx(0.5)
    assert snap.itl.count == 1 and snap.itl.sum == pytest.approx(0.2)
    assert snap.e2e.count == 1 and snap.e2e.sum == pytest.approx(1.0)
    assert snap.finished == {"length": 1, "abort": 1}


def test_render_is_valid_prometheus_text() -> None:
    m = ServingMetrics()
    m.on_added("a", 0.0)
    m.on_tokens("a", 2, 4, 0.002)
    m.on_finished("a", "stop", 0.5)
    stats = EngineStats(2, 1, 6, 8, 3, 0.25, 40, 16, 1)
    text = render_metrics(stats, m.snapshot(), 'my "model"')
    samples = parse_metrics(text)
    model = {"model_name": 'my \\"model\\"'}
    assert metric(samples, "hwlm:num_requests_running", **model) == 2
    assert metric(samples, "hwlm:num_requests_waiting") == 1
    assert metric(samples, "hwlm:kv_cache_usage_perc") == 0.25
    assert metric(samples, "hwlm:prompt_tokens_total") == 4
    assert metric(samples, "hwlm:generation_tokens_total") == 2
    assert metric(samples, "hwlm:prefix_cache_queries_total") == 40
    assert metric(samples, "hwlm:prefix_cache_hits_total") == 16
    assert metric(samples, "hwlm:num_preemptions_total") == 1
    assert metric(samples, "hwlm:request_success_total", finished_reason="stop") == 1
    assert metric(samples, "hwlm:request_success_total", finished_reason="abort") == 0
    assert metric(samples, "hwlm:time_to_first_token_seconds_bucket", le="0.001") == 0
    assert metric(samples, "hwlm:time_to_first_token_seconds_bucket", le="0.005") == 1
    assert metric(samples, "hwlm:time_to_first_token_seconds_bucket", le="+Inf") == 1
    assert metric(samples, "hwlm:e2e_request_latency_seconds_count") == 1
    assert metric(samples, "hwlm:inter_token_latency_seconds_count") == 0
    assert "# TYPE hwlm:time_to_first_token_seconds histogram" in text
    assert "# TYPE hwlm:prompt_tokens_total counter" in text


def test_async_engine_records_non_streamed_requests() -> None:
    engine = AsyncLLMEngine(FakeEngine(tokens=3))

    async def main() -> None:
        async for _ in engine.generate("p", SamplingParams(), "a", stream=False):
            pass

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
        snap = engine.metrics.snapshot()
        assert snap.generation_tokens == 3 and snap.prompt_tokens == 2
        assert snap.ttft.count == snap.e2e.count == 1
        assert snap.finished == {"length": 1}
    finally:
        engine.shutdown()
