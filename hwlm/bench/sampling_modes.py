"""``--sampling`` for the throughput benchmark: greedy, or a random-sampling mix (temperature,
top-p, top-k and a repetition penalty on every request, as docs/benchmarks.md describes), so
the cost of the sampler's full path can be compared with the greedy figure of the same workload."""

from __future__ import annotations

import argparse
from typing import Any

SAMPLING_MODES: dict[str, dict[str, Any]] = {
    "greedy": dict(temperature=0.0),
    "random": dict(temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1),
}


def add_sampling_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sampling",
        choices=sorted(SAMPLING_MODES),
        default=None,
        help="greedy, or random: temperature 0.8, top_p 0.95, top_k 50, repetition_penalty "
        "1.1 on every request (overrides --temperature)",
    )


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SamplingParams keyword arguments for the chosen mode (--temperature without one)."""
    mode = getattr(args, "sampling", None)
    if mode is None:
        return dict(temperature=args.temperature)
    if mode != "greedy" and getattr(args, "compare_hf", False):
        raise ValueError("--compare-hf times greedy transformers generate; use --sampling greedy")
    return dict(SAMPLING_MODES[mode])
