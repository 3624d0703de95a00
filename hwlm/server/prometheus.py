"""GET /metrics: Prometheus' text exposition format (version 0.0.4), written by hand.

vLLM's metric names under an ``hwlm:`` prefix, each labelled with ``model_name``:

- gauges: ``num_requests_running``, ``num_requests_waiting``, ``kv_cache_usage_perc`` (0..1);
- counters: ``prompt_tokens_total``, ``generation_tokens_total``, ``prefix_cache_queries_total``
  and ``prefix_cache_hits_total`` (in tokens), ``num_preemptions_total``,
  ``request_success_total`` (labelled ``finished_reason``: stop, length, abort);
- histograms: ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
  ``e2e_request_latency_seconds``.
"""

from __future__ import annotations

import math

from hwlm.server.async_engine import EngineStats
from hwlm.server.metrics import Histogram, MetricsSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "hwlm:"
FINISH_REASONS = ("stop", "length", "abort")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self, model_name: str) -> None:
        self.base = {"model_name": model_name}
        self.lines: list[str] = []

    def header(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {PREFIX}{name} {help_text}")
        self.lines.append(f"# TYPE {PREFIX}{name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{PREFIX}{name}{_labels({**self.base, **labels})} {_number(value)}")

    def scalar(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.header(name, kind, help_text)
        self.sample(name, value)

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        self.header(name, "histogram", help_text)
        for bound, count in hist.cumulative():
            self.sample(f"{name}_bucket", count, le=_number(bound))
        self.sample(f"{name}_sum", hist.sum)
        self.sample(f"{name}_count", hist.count)


def render_metrics(stats: EngineStats, metrics: MetricsSnapshot, model_name: str) -> str:
    """The whole /metrics page."""
    w = _Writer(model_name)
    w.scalar("num_requests_running", "gauge", "Requests in the running batch.", stats.num_running)
    w.scalar("num_requests_waiting", "gauge", "Requests waiting to run.", stats.num_waiting)
    w.scalar(
        "kv_cache_usage_perc", "gauge", "KV-cache usage: 1 means 100 percent used.",
        stats.kv_cache_usage,
    )  # fmt: skip
    w.scalar("prompt_tokens_total", "counter", "Prefill tokens processed.", metrics.prompt_tokens)
    w.scalar(
        "generation_tokens_total", "counter", "Generation tokens processed.",
        metrics.generation_tokens,
    )  # fmt: skip
    w.scalar(
        "prefix_cache_queries_total", "counter", "Prefix-cache queries, in tokens.",
        stats.prefix_cache_queries,
    )  # fmt: skip
    w.scalar(
        "prefix_cache_hits_total", "counter", "Prefix-cache hits, in tokens.",
        stats.prefix_cache_hits,
    )  # fmt: skip
    w.scalar(
        "num_preemptions_total", "counter", "Cumulative number of preemptions.",
        stats.num_preemptions,
    )  # fmt: skip
    w.header("request_success_total", "counter", "Finished requests, by finish reason.")
    reasons = [*FINISH_REASONS, *sorted(set(metrics.finished) - set(FINISH_REASONS))]
    for reason in reasons:
        w.sample("request_success_total", metrics.finished.get(reason, 0), finished_reason=reason)
    w.histogram("time_to_first_token_seconds", "Time to first token in seconds.", metrics.ttft)
    w.histogram("inter_token_latency_seconds", "Inter-token latency in seconds.", metrics.itl)
    w.histogram(
        "e2e_request_latency_seconds", "End-to-end request latency in seconds.", metrics.e2e
    )
    return "\n".join(w.lines) + "\n"
