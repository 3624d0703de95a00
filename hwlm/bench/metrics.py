"""``hwlm bench serve``'s figures under ``vllm bench serve``'s names and definitions.

Completed requests (not failed, not abandoned) count. TTFT is the time to the first content
chunk, ITL each gap between content chunks, TPOT a request's (latency - TTFT) / (output tokens
- 1), E2EL its whole latency; each is summarised as mean, median, std and the chosen percentiles
in milliseconds (0 where there is no data, as vLLM writes it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hwlm.bench.client import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_METRICS = ("ttft", "tpot", "itl")
DEFAULT_PERCENTILES = (99.0,)


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), in milliseconds; None without data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return value * 1000


def percentile_name(q: float) -> str:
    """vLLM's key for a percentile: ``p99``, ``p99.9``."""
    return f"p{int(q)}" if int(q) == q else f"p{q}"


def samples(results: list[RequestResult]) -> dict[str, list[float]]:
    """Each metric's samples, in seconds, over the completed requests."""
    done = [r for r in results if r.ok]
    return {
        "ttft": [r.ttft_s for r in done if r.ttft_s is not None],
        "tpot": [
            (r.latency_s - r.ttft_s) / (r.output_tokens - 1)
            for r in done
            if r.ttft_s is not None and r.output_tokens > 1
        ],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.latency_s for r in done],
    }


def vllm_metrics(
    results: list[RequestResult],
    duration_s: float,
    metrics: Sequence[str] = DEFAULT_METRICS,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """The counts, throughputs and latency summaries of ``vllm bench serve``'s result."""
    done = [r for r in results if r.ok]
    total_input = sum(r.prompt_len or 0 for r in done)
    total_output = sum(r.output_tokens for r in done)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": sum(r.error is not None for r in results),
        "aborted": sum(r.aborted for r in results),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) * per_s,
        "output_throughput": total_output * per_s,
        "total_token_throughput": (total_input + total_output) * per_s,
    }
    values = samples(results)
    for metric in metrics:
        ms = np.asarray(values[metric], dtype=float) * 1000
        out[f"mean_{metric}_ms"] = float(ms.mean()) if ms.size else 0.0
        out[f"median_{metric}_ms"] = float(np.median(ms)) if ms.size else 0.0
        out[f"std_{metric}_ms"] = float(ms.std()) if ms.size else 0.0
        for q in percentiles:
            value = float(np.percentile(ms, q)) if ms.size else 0.0
            out[f"{percentile_name(q)}_{metric}_ms"] = value
    return out
