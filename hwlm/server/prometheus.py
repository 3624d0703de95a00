"""GET /metrics: Prometheus' text exposition format, written by ``prometheus_client``.

vLLM's metric names under an ``hwlm:`` prefix, each labelled with ``model_name``:

- gauges: ``num_requests_running``, ``num_requests_waiting``, ``kv_cache_usage_perc`` (0..1);
- counters: ``prompt_tokens_total``, ``generation_tokens_total``, ``prefix_cache_queries_total``
  and ``prefix_cache_hits_total`` (in tokens), ``num_preemptions_total``,
  ``request_success_total`` (labelled ``finished_reason``: stop, length, abort);
- histograms: ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
  ``e2e_request_latency_seconds``.

With several engine cores (``--data-parallel-size``) these are the sums over the cores (KV usage:
of all their blocks), and each core's own figures follow with an ``engine`` label (its index),
where vLLM labels its metrics by engine: ``engine_num_requests_running``,
``engine_num_requests_waiting``, ``engine_kv_cache_usage_perc``, ``engine_prompt_tokens_total``,
``engine_generation_tokens_total`` and ``engine_request_success_total`` (all finish reasons).

Nothing is counted here: the engine keeps the totals, and a ``ServingCollector`` turns a snapshot
of them into metric families at scrape time. So the page reads the same whether the stats come
from a thread of this process or, later, as messages from an engine process. Each app has its own
``CollectorRegistry`` (not prometheus_client's global one), so several apps can share a process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from hwlm.engine.messages import EngineStats as CoreStats
from hwlm.engine.serving_metrics import Histogram, MetricsSnapshot
from hwlm.server.async_engine import EngineStats

PREFIX = "hwlm:"
FINISH_REASONS = ("stop", "length", "abort")
LABELS = ["model_name"]

# Always the classic text format (0.0.4), whatever the scraper's Accept header prefers: every
# Prometheus reads it, and prometheus_client's OpenMetrics writer rewrites the ':' of our names.
_encode, CONTENT_TYPE = choose_encoder("text/plain; version=0.0.4")


class ServingCollector(Collector):
    """Every hwlm metric family, built from ``engine_stats()`` (scheduler and KV-cache gauges and
    counters) and ``serving_stats()`` (request counters and latency histograms) at each scrape."""

    def __init__(
        self,
        model_name: str,
        engine_stats: Callable[[], EngineStats],
        serving_stats: Callable[[], MetricsSnapshot],
        core_stats: Callable[[], Sequence[CoreStats]] | None = None,
    ) -> None:
        self._model = [model_name]
        self._engine_stats = engine_stats
        self._serving_stats = serving_stats
        self._core_stats = core_stats

    def collect(self) -> Iterator[Metric]:
        stats, serving = self._engine_stats(), self._serving_stats()
        yield self._gauge(
            "num_requests_running", "Requests in the running batch.", stats.num_running
        )
        yield self._gauge("num_requests_waiting", "Requests waiting to run.", stats.num_waiting)
        yield self._gauge(
            "kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent used.", stats.kv_cache_usage
        )
        yield self._counter("prompt_tokens", "Prefill tokens processed.", serving.prompt_tokens)
        yield self._counter(
            "generation_tokens", "Generation tokens processed.", serving.generation_tokens
        )
        yield self._counter(
            "prefix_cache_queries", "Prefix-cache queries, in tokens.", stats.prefix_cache_queries
        )
        yield self._counter(
            "prefix_cache_hits", "Prefix-cache hits, in tokens.", stats.prefix_cache_hits
        )
        yield self._counter(
            "num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions
        )
        yield self._finished(serving.finished)
        yield self._histogram(
            "time_to_first_token_seconds", "Time to first token in seconds.", serving.ttft
        )
        yield self._histogram(
            "inter_token_latency_seconds", "Inter-token latency in seconds.", serving.itl
        )
        yield self._histogram(
            "e2e_request_latency_seconds", "End-to-end request latency in seconds.", serving.e2e
        )
        cores = self._core_stats() if self._core_stats is not None else []
        if len(cores) > 1:
            yield from self._per_core(cores)

    def _per_core(self, cores: Sequence[CoreStats]) -> Iterator[Metric]:
        """Each engine core's figures, labelled ``engine`` (--data-parallel-size)."""
        families = (
            (GaugeMetricFamily, "num_requests_running", "Requests in the core's running batch."),
            (GaugeMetricFamily, "num_requests_waiting", "Requests waiting on the core."),
            (GaugeMetricFamily, "kv_cache_usage_perc", "The core's KV-cache usage (1 = full)."),
            (CounterMetricFamily, "prompt_tokens", "Prefill tokens the core processed."),
            (CounterMetricFamily, "generation_tokens", "Tokens the core generated."),
            (CounterMetricFamily, "request_success", "Requests the core finished."),
        )
        for kind, name, help_text in families:
            family = kind(f"{PREFIX}engine_{name}", help_text, labels=[*LABELS, "engine"])
            for index, stats in enumerate(cores):
                family.add_metric([*self._model, str(index)], _core_value(stats, name))
            yield family

    def _gauge(self, name: str, help_text: str, value: float) -> Metric:
        family = GaugeMetricFamily(PREFIX + name, help_text, labels=LABELS)
        family.add_metric(self._model, value)
        return family

    def _counter(self, name: str, help_text: str, value: float) -> Metric:
        family = CounterMetricFamily(PREFIX + name, help_text, labels=LABELS)
        family.add_metric(self._model, value)
        return family

    def _finished(self, finished: dict[str, int]) -> Metric:
        """Finished requests by reason; the usual reasons appear even before they occur."""
        family = CounterMetricFamily(
            PREFIX + "request_success",
            "Finished requests, by finish reason.",
            labels=[*LABELS, "finished_reason"],
        )
        for reason in [*FINISH_REASONS, *sorted(set(finished) - set(FINISH_REASONS))]:
            family.add_metric([*self._model, reason], finished.get(reason, 0))
        return family

    def _histogram(self, name: str, help_text: str, hist: Histogram) -> Metric:
        family = HistogramMetricFamily(PREFIX + name, help_text, labels=LABELS)
        buckets = [(_le(bound), count) for bound, count in hist.cumulative()]
        family.add_metric(self._model, buckets, hist.sum)
        return family


def _core_value(stats: CoreStats, name: str) -> float:
    value = {
        "num_requests_running": stats.num_running,
        "num_requests_waiting": stats.num_waiting,
        "kv_cache_usage_perc": stats.kv_cache_usage,
        "prompt_tokens": stats.prompt_tokens,
        "generation_tokens": stats.generation_tokens,
        "request_success": sum(stats.finished.values()),
    }[name]
    return float(value)


def _le(bound: float) -> str:
    """A bucket's ``le`` label, spelled as Prometheus' own clients do ("0.5", "10.0", "+Inf")."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def metrics_registry(
    model_name: str,
    engine_stats: Callable[[], EngineStats],
    serving_stats: Callable[[], MetricsSnapshot],
    core_stats: Callable[[], Sequence[CoreStats]] | None = None,
) -> CollectorRegistry:
    """A private registry holding one ``ServingCollector`` (``core_stats``: each engine
    core's stats, for the per-core families)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServingCollector(model_name, engine_stats, serving_stats, core_stats))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The /metrics page of ``registry``, to be sent with ``CONTENT_TYPE``."""
    return _encode(registry)
