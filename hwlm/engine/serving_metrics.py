"""Request-level serving metrics: token counters and latency histograms.

``AsyncLLMEngine`` feeds these from its engine thread after every step (it sees each request's
output-token count there, streamed or not); the HTTP handler reads a ``snapshot()`` from the event
loop, hence the lock. Bucket bounds are vLLM's, so dashboards built for vLLM read hwlm unchanged.
Pure Python: importing this module needs no web framework.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass
class Histogram:
    """A Prometheus histogram: ``counts[i]`` holds observations in ``(bounds[i-1], bounds[i]]``;
    the last slot holds those above every bound."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` (``times`` observations of it)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, ending with (inf, count)."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum, self.count)


@dataclass
class MetricsSnapshot:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


@dataclass
class _Live:
    """What is known of one request in flight."""

    arrival: float
    num_tokens: int = 0  # output tokens seen so far, over all of its samples
    last_token: float | None = None


class ServingMetrics:
    """Counters and histograms over every request the async engine has served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = MetricsSnapshot()
        self._live: dict[str, _Live] = {}

    def on_added(self, request_id: str, arrival: float) -> None:
        with self._lock:
            self._live[request_id] = _Live(arrival)

    def on_tokens(
        self, request_id: str, num_output_tokens: int, num_prompt_tokens: int, now: float
    ) -> None:
        """The request has produced ``num_output_tokens`` so far (a count that never shrinks
        is assumed; a smaller one is ignored)."""
        self.on_step({request_id: (num_output_tokens, num_prompt_tokens)}, now)

    def on_step(self, counts: dict[str, tuple[int, int]], now: float) -> None:
        """``on_tokens`` for every request of a step at once: request id -> (output tokens so
        far, prompt tokens). Requests whose last token came at the same time (every running
        request, in steady decoding) share one inter-token observation."""
        intervals: dict[float, int] = {}  # last token's time -> requests
        with self._lock:
            totals, live_requests = self._totals, self._live
            for request_id, (num_output_tokens, num_prompt_tokens) in counts.items():
                live = live_requests.get(request_id)
                if live is None or num_output_tokens <= live.num_tokens:
                    continue
                last = live.last_token
                if last is None:
                    totals.ttft.observe(now - live.arrival)
                    totals.prompt_tokens += num_prompt_tokens
                else:
                    intervals[last] = intervals.get(last, 0) + 1
                totals.generation_tokens += num_output_tokens - live.num_tokens
                live.num_tokens, live.last_token = num_output_tokens, now
            for last, times in intervals.items():
                totals.itl.observe(now - last, times)

    def on_finished(self, request_id: str, finish_reason: str | None, now: float) -> None:
        with self._lock:
            live = self._live.pop(request_id, None)
            if live is None:
                return
            self._totals.e2e.observe(now - live.arrival)
            self._count_finished(finish_reason or "stop")

    def on_aborted(self, request_id: str) -> None:
        with self._lock:
            if self._live.pop(request_id, None) is not None:
                self._count_finished("abort")

    def _count_finished(self, reason: str) -> None:
        finished = self._totals.finished
        finished[reason] = finished.get(reason, 0) + 1

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            t = self._totals
            return MetricsSnapshot(
                t.prompt_tokens, t.generation_tokens, dict(t.finished),
                t.ttft.copy(), t.itl.copy(), t.e2e.copy(),
            )  # fmt: skip


def finish_reason(reasons: Sequence[str | None]) -> str | None:
    """One finish reason for a request of several samples: "length" if any ran out, else the
    first one given."""
    if "length" in reasons:
        return "length"
    return next((r for r in reasons if r), None)
