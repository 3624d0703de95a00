"""``hwlm bench serve``: load a running OpenAI-compatible server the way ``vllm bench serve`` does.

Streams completions (or chat completions) of random words or of token-id prompts of exact
lengths (vLLM's ``--dataset-name random``), at a request rate with gamma-distributed gaps and/or
under a concurrency limit, optionally abandoning a share mid-stream. The streams are read with
aiohttp over ``--client-processes`` processes; ``--measure-ceiling`` first runs the same workload
against a stand-in server (``hwlm.bench.standin``) to show what the load generator itself can
read. Figures carry vLLM's names and definitions (``hwlm.bench.metrics``); ``--save-result``
writes them as vLLM does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from hwlm.bench.aio import run_async
from hwlm.bench.client import ENDPOINTS, RequestResult
from hwlm.bench.client_pool import ClientPool
from hwlm.bench.datasets import random_prompts
from hwlm.bench.load import (
    DATASETS,
    BenchConfig,
    BenchResult,
    abort_plan,
    build_requests,
    resolve_model,
    run_benchmark,
)
from hwlm.bench.metrics import DEFAULT_METRICS, METRICS, percentile_ms
from hwlm.bench.standin import StandinServer

__all__ = [
    "BenchConfig",
    "BenchResult",
    "RequestResult",
    "abort_plan",
    "random_prompts",
    "run_benchmark",
    "_percentile_ms",
]
_percentile_ms = percentile_ms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None, help="default: http://HOST:PORT")
    server.add_argument("--host", default="localhost", help="(default: %(default)s)")
    server.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    server.add_argument(
        "--endpoint",
        default=ENDPOINTS[0],
        help=f"one of {', '.join(ENDPOINTS)} (default: %(default)s)",
    )
    server.add_argument("--model", default=None, help="default: the server's first model")
    server.add_argument(
        "--api-key",
        default=os.environ.get("HWLM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="Bearer key (default: $HWLM_API_KEY, else $OPENAI_API_KEY)",
    )
    data = parser.add_argument_group("workload")
    data.add_argument("--num-prompts", type=int, default=100, help="requests (default: 100)")
    data.add_argument(
        "--dataset-name",
        default="words",
        choices=DATASETS,
        help="words: --input-len random words; random: token ids of exact lengths, as vLLM's "
        "(default: words)",
    )
    data.add_argument("--input-len", type=int, default=32, help="words: words per prompt")
    data.add_argument("--output-len", type=int, default=16, help="words: max_tokens per request")
    data.add_argument("--random-input-len", type=int, default=1024, help="random: prompt tokens")
    data.add_argument(
        "--random-output-len", type=int, default=128, help="random: max_tokens per request"
    )
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="random: lengths uniform in [len (1 - r), len (1 + r)], 0 <= r < 1 (default: 0)",
    )
    data.add_argument(
        "--random-input-range",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="random: prompt lengths uniform in [MIN, MAX] instead (outputs keep their range)",
    )
    data.add_argument(
        "--tokenizer",
        default=None,
        help="random: the vocabulary to draw from (and the text of chat prompts); default: the "
        "model's",
    )
    data.add_argument("--seed", type=int, default=0, help="prompts and arrivals (default: 0)")
    data.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    data.add_argument(
        "--abort-fraction", type=float, default=0.0, help="share abandoned mid-stream (0..1)"
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second (default: inf, all at once)",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrival gaps: 1 is Poisson, lower is burstier (default: 1)",
    )
    load.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (default: all)"
    )
    load.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes reading the streams; rate and concurrency hold for the whole run",
    )
    load.add_argument(
        "--measure-ceiling",
        action="store_true",
        help="first run the same workload against a stand-in server: the generator's ceiling",
    )
    load.add_argument(
        "--ceiling-server-processes",
        type=int,
        default=None,
        help="stand-in server processes (default: the CPUs left by the client processes)",
    )
    out = parser.add_argument_group("results")
    out.add_argument(
        "--percentile-metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated, of {','.join(METRICS)} (default: %(default)s)",
    )
    out.add_argument(
        "--metric-percentiles", default="99", help="comma-separated (default: %(default)s)"
    )
    out.add_argument("--save-result", action="store_true", help="write vLLM's result JSON")
    out.add_argument("--result-dir", default=None, help="folder for --save-result (default: .)")
    out.add_argument(
        "--result-filename", default=None, help="file name for the result JSON (implies save)"
    )
    out.add_argument("--output-json", default=None, help="write the summary here")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The workload of the command line; ValueError naming the first bad value."""
    _check_args(args)
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    return BenchConfig(
        base_url=base_url.rstrip("/"),
        model=args.model,
        num_prompts=args.num_prompts,
        dataset=args.dataset_name,
        input_len=args.input_len,
        output_len=args.output_len,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        random_input_range=tuple(args.random_input_range) if args.random_input_range else None,
        tokenizer=args.tokenizer,
        endpoint=args.endpoint,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        client_processes=args.client_processes,
        abort_fraction=args.abort_fraction,
        seed=args.seed,
        temperature=args.temperature,
        api_key=args.api_key,
    )


def _check_args(args: argparse.Namespace) -> None:
    positive = {
        "--num-prompts": args.num_prompts,
        "--input-len": args.input_len,
        "--output-len": args.output_len,
        "--random-input-len": args.random_input_len,
        "--random-output-len": args.random_output_len,
        "--client-processes": args.client_processes,
    }
    if args.max_concurrency is not None:
        positive["--max-concurrency"] = args.max_concurrency
    if args.ceiling_server_processes is not None:
        positive["--ceiling-server-processes"] = args.ceiling_server_processes
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf: all at once), got {args.request_rate}")
    if not 0 < args.burstiness < math.inf:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if (
        args.random_input_range
        and not 1 <= args.random_input_range[0] <= args.random_input_range[1]
    ):
        raise ValueError(
            f"--random-input-range needs 1 <= MIN <= MAX, got {args.random_input_range}"
        )
    if not 0.0 <= args.abort_fraction <= 1.0:
        raise ValueError(f"--abort-fraction must be in [0, 1], got {args.abort_fraction}")
    if args.endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {args.endpoint}")
    _metric_names(args.percentile_metrics)
    _percentiles(args.metric_percentiles)


def _metric_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"--percentile-metrics: unknown {unknown or text!r}; choose from {METRICS}"
        )
    return names


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles must be numbers in (0, 100], got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    ceiling_procs = args.ceiling_server_processes or max(
        1, (os.cpu_count() or 2) - config.client_processes
    )
    with contextlib.ExitStack() as stack:
        # Fork the stand-in's and the client's processes first, before this one has threads.
        standin = StandinServer(processes=ceiling_procs) if args.measure_ceiling else None
        standin_url = stack.enter_context(standin) if standin else None
        pool = None
        if config.client_processes > 1:
            pool = ClientPool(config.client_processes).start()
            stack.callback(pool.close)
        model = run_async(resolve_model(config))
        config = replace(config, model=model)
        requests = build_requests(config, model)
        ceiling = None
        if standin and standin_url:
            standin_config = replace(config, base_url=standin_url, api_key=None)
            ceiling = run_async(run_benchmark(standin_config, requests, pool))
            standin.__exit__(None, None, None)  # its processes are not needed any more
        result = run_async(run_benchmark(config, requests, pool))
    return _report(args, result, ceiling)


def _report(args: argparse.Namespace, result: BenchResult, ceiling: BenchResult | None) -> int:
    metrics = result.metrics(
        metrics=_metric_names(args.percentile_metrics),
        percentiles=_percentiles(args.metric_percentiles),
    )
    if ceiling is not None:
        limit = ceiling.metrics()
        metrics["ceiling_output_throughput"] = limit["output_throughput"]
        metrics["ceiling_request_throughput"] = limit["request_throughput"]
        metrics["ceiling_failed"] = limit["failed"]
    for key, value in metrics.items():
        shown = f"{value:.2f}" if isinstance(value, float) else value
        print(f"{key:<28}{shown}")
    if args.output_json:
        summary = result.summary()
        summary.update({k: v for k, v in metrics.items() if k.startswith("ceiling_")})
        Path(args.output_json).write_text(json.dumps(summary, indent=2))
    if args.save_result or args.result_filename:
        path = _result_path(args, result)
        path.write_text(json.dumps(vllm_result(args, result, metrics), indent=2))
        print(f"result written to {path}")
    errors = [r.error for r in result.results if r.error]
    if errors:
        print(f"{len(errors)} request(s) failed, first: {errors[0]}", file=sys.stderr)
    return 1 if errors else 0


def _result_path(args: argparse.Namespace, result: BenchResult) -> Path:
    config = result.config
    name: str
    if args.result_filename:
        name = str(args.result_filename)
    else:
        concurrency = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        model = Path(result.model).name or "model"
        name = f"hwlm-{config.request_rate}qps{concurrency}-{model}-{stamp}.json"
    return Path(args.result_dir or ".") / name


def vllm_result(
    args: argparse.Namespace, result: BenchResult, metrics: dict[str, Any]
) -> dict[str, Any]:
    """``vllm bench serve --save-result``'s JSON: the run's settings, the figures, and each
    request's lengths, latencies, text and error."""
    config = result.config
    done = [r for r in result.results if r.ok]
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if config.endpoint.endswith("chat/completions") else "openai",
        "endpoint_type": "openai",
        "label": "hwlm",
        "model_id": result.model,
        "tokenizer_id": config.tokenizer or result.model,
        "num_prompts": config.num_prompts,
        "request_rate": config.request_rate if math.isfinite(config.request_rate) else "inf",
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "client_processes": config.client_processes,
        **metrics,
        "input_lens": [r.prompt_len or 0 for r in done],
        "output_lens": [r.output_tokens for r in done],
        "ttfts": [r.ttft_s or 0.0 for r in done],
        "itls": [r.itl_s for r in done],
        "generated_texts": [r.text for r in done],
        "errors": [r.error or "" for r in result.results],
    }
