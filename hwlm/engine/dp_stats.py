"""The engine cores' stats as one engine's (``--data-parallel-size``): /metrics reads the sums.

Counts add up (requests, sequences, blocks, tokens, finished requests by reason, histogram
buckets); KV-cache usage is the share of all the cores' blocks in use.
"""

from __future__ import annotations

from collections.abc import Sequence

from hwlm.engine.messages import EngineStats, HistogramCounts
from hwlm.engine.serving_metrics import MetricsSnapshot

_SUMMED = (
    "num_running",
    "num_waiting",
    "num_running_seqs",
    "num_waiting_seqs",
    "num_free_blocks",
    "num_blocks",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
    "prompt_tokens",
    "generation_tokens",
)


def merge_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """One ``EngineStats`` for all of ``stats``."""
    merged = EngineStats(**{name: sum(getattr(s, name) for s in stats) for name in _SUMMED})
    used = merged.num_blocks - merged.num_free_blocks
    merged.kv_cache_usage = used / merged.num_blocks if merged.num_blocks else 0.0
    merged.finished = _merge_counts([s.finished for s in stats])
    for name in ("ttft", "itl", "e2e"):
        setattr(merged, name, _merge_histograms([getattr(s, name) for s in stats]))
    return merged


def merge_serving(snapshots: Sequence[MetricsSnapshot]) -> MetricsSnapshot:
    """One ``MetricsSnapshot`` (request counters, latency histograms) for all of them."""
    merged = MetricsSnapshot(
        sum(s.prompt_tokens for s in snapshots),
        sum(s.generation_tokens for s in snapshots),
        _merge_counts([s.finished for s in snapshots]),
    )
    for name in ("ttft", "itl", "e2e"):
        total = getattr(merged, name)
        for snapshot in snapshots:
            hist = getattr(snapshot, name)
            total.counts = [a + b for a, b in zip(total.counts, hist.counts, strict=True)]
            total.sum += hist.sum
            total.count += hist.count
    return merged


def _merge_counts(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def _merge_histograms(hists: Sequence[HistogramCounts | None]) -> HistogramCounts | None:
    present = [h for h in hists if h is not None]
    if not present:
        return None
    counts = [sum(column) for column in zip(*(h.counts for h in present), strict=True)]
    return HistogramCounts(counts, sum(h.sum for h in present), sum(h.count for h in present))
