"""Serving metrics: histograms, the Prometheus page, and what AsyncLLMEngine records."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from hwlm.engine.serving_metrics import Histogram, ServingMetrics
from hwlm.sampling_params import SamplingParams
from hwlm.server.async_engine import AsyncLLMEngine, EngineStats
from hwlm.server.prometheus import metrics_registry, render_metrics
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


def test_a_step_of_many_requests_counts_each_interval() -> None:
    """``on_step`` shares one observation between requests whose last token came together,
    and must count exactly what one ``on_tokens`` per request counts."""
    one_by_one, batched = ServingMetrics(), ServingMetrics()
    for m in (one_by_one, batched):
        for r in "abc":
            m.on_added(r, arrival=0.0)
    steps = [
        (0.25, {"a": (1, 3), "b": (1, 4)}),
        (0.5, {"a": (2, 3), "b": (2, 4), "c": (1, 5)}),
        (2.5, {"a": (4, 3), "b": (2, 4), "c": (2, 5)}),
    ]
    for now, counts in steps:
        batched.on_step(counts, now)
        for request_id, (num_output, num_prompt) in counts.items():
            one_by_one.on_tokens(request_id, num_output, num_prompt, now)
    a, b = one_by_one.snapshot(), batched.snapshot()
    assert (b.prompt_tokens, b.generation_tokens) == (12, 8)
    assert (a.prompt_tokens, a.generation_tokens) == (b.prompt_tokens, b.generation_tokens)
    for name in ("ttft", "itl"):
        ha, hb = getattr(a, name), getattr(b, name)
        assert (ha.counts, ha.count) == (hb.counts, hb.count)
        assert ha.sum == pytest.approx(hb.sum)
    assert b.itl.count == 4 and b.itl.sum == pytest.approx(2 * 0.25 + 2 * 2.0)


def test_render_is_valid_prometheus_text() -> None:
    m = ServingMetrics()
    m.on_added("a", 0.0)
    m.on_tokens("a", 2, 4, 0.002)
    m.on_finished("a", "stop", 0.5)
    stats = EngineStats(2, 1, 6, 8, 3, 0.25, 40, 16, 1)
    registry = metrics_registry('my "model"', lambda: stats, m.snapshot)
    text = render_metrics(registry).decode()
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
    assert "# HELP hwlm:prompt_tokens_total Prefill tokens processed." in text


def test_scrape_reads_the_stats_of_that_moment() -> None:
    m = ServingMetrics()
    stats = [EngineStats(1, 0, 8, 8, 1)]
    registry = metrics_registry("m", lambda: stats[0], m.snapshot)
    assert (
        metric(parse_metrics(render_metrics(registry).decode()), "hwlm:num_requests_running") == 1
    )
    stats[0] = EngineStats(3, 2, 8, 8, 5, num_preemptions=4)
    m.on_added("a", 0.0)
    m.on_aborted("a")
    samples = parse_metrics(render_metrics(registry).decode())
    assert metric(samples, "hwlm:num_requests_running") == 3
    assert metric(samples, "hwlm:num_requests_waiting") == 2
    assert metric(samples, "hwlm:num_preemptions_total") == 4
    assert metric(samples, "hwlm:request_success_total", finished_reason="abort") == 1


def test_two_registries_in_one_process_do_not_clash() -> None:
    stats = EngineStats(1, 0, 8, 8, 1)
    a = metrics_registry("a", lambda: stats, ServingMetrics().snapshot)
    b = metrics_registry("b", lambda: EngineStats(2, 0, 8, 8, 2), ServingMetrics().snapshot)
    assert metric(parse_metrics(render_metrics(a).decode()), "hwlm:num_requests_running") == 1
    assert metric(parse_metrics(render_metrics(b).decode()), "hwlm:num_requests_running") == 2


def test_stats_snapshot_is_published_and_zeroed_when_stopped() -> None:
    fake = FakeEngine()
    fake.scheduler.running = [SimpleNamespace(request_id="r"), SimpleNamespace(request_id="r")]
    fake.scheduler.num_preemptions = 5
    fake.block_manager.num_free_blocks = 1
    engine = AsyncLLMEngine(fake)  # publishes its stats when its thread first goes idle
    try:
        deadline = time.monotonic() + 10
        while engine.stats_snapshot().num_blocks == 0:
            assert time.monotonic() < deadline, "no stats published"
            time.sleep(0.01)
        stats = engine.stats_snapshot()
        assert (stats.num_running, stats.kv_cache_usage, stats.num_preemptions) == (1, 0.75, 5)
    finally:
        engine.shutdown()
    stats = engine.stats_snapshot()  # stopped: nothing runs, the counters stay
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert stats.num_free_blocks == stats.num_blocks == 4 and stats.num_preemptions == 5


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
