"""``hwlm bench serve``: a load generator against a running OpenAI-compatible server (like
``vllm bench serve``). It streams completions for random prompts from a seeded generator, at a
Poisson request rate and/or a concurrency limit, can abort a fraction of the requests mid-stream,
and reports time to first token and inter-token latency (p50/p99) and output tokens per second.

The machinery (``run_benchmark``) returns every request's result, so tests use it to check
correctness under load, not just speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

WORDS = (
    "the of and to in is was for on that with as by at from his her an be this are have not but "
    "had were which their one all there been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under"
).split()


@dataclass
class BenchConfig:
    base_url: str
    model: str | None = None  # None: the first model of GET /v1/models
    num_prompts: int = 100
    input_len: int = 32  # words per random prompt
    output_len: int = 16  # max_tokens
    request_rate: float = math.inf  # requests per second (Poisson arrivals); inf: all at once
    max_concurrency: int | None = None
    abort_fraction: float = 0.0  # this share of requests is abandoned mid-stream
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0


@dataclass
class RequestResult:
    index: int
    prompt: str
    text: str = ""
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    latency_s: float = 0.0
    aborted: bool = False  # abandoned by design (abort_fraction)
    error: str | None = None
    status: int | None = None
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return not self.aborted and self.error is None


@dataclass
class BenchResult:
    config: BenchConfig
    results: list[RequestResult]
    duration_s: float

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.results if r.ok]
        ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
        itls = [gap for r in done for gap in r.itl_s]
        tokens = sum(r.output_tokens for r in done)
        return {
            "completed": len(done),
            "aborted": sum(r.aborted for r in self.results),
            "failed": sum(r.error is not None for r in self.results),
            "duration_s": self.duration_s,
            "request_throughput": len(done) / self.duration_s if self.duration_s else 0.0,
            "output_throughput": tokens / self.duration_s if self.duration_s else 0.0,
            "total_output_tokens": tokens,
            "ttft_ms_p50": _percentile_ms(ttfts, 50),
            "ttft_ms_p99": _percentile_ms(ttfts, 99),
            "itl_ms_p50": _percentile_ms(itls, 50),
            "itl_ms_p99": _percentile_ms(itls, 99),
        }


def _percentile_ms(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), in milliseconds; None without data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return value * 1000


def random_prompts(num: int, input_len: int, seed: int) -> list[str]:
    """``num`` prompts of ``input_len`` words each, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=input_len)) for _ in range(num)]


def abort_plan(config: BenchConfig) -> dict[int, int]:
    """Which requests to abandon, and after how many content chunks: at least one, so that the
    abort happens mid-stream, and early in the stream, since a busy server may send several
    tokens in one chunk (a request whose stream ends first completes instead)."""
    rng = random.Random(config.seed + 1)
    count = round(config.num_prompts * config.abort_fraction)
    chosen = rng.sample(range(config.num_prompts), count)
    return {i: rng.randint(1, max(1, config.output_len // 4)) for i in chosen}


async def run_benchmark(config: BenchConfig) -> BenchResult:
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=config.base_url, headers=headers, timeout=config.timeout_s, limits=limits
    ) as client:
        model = config.model or await _first_model(client)
        prompts = random_prompts(config.num_prompts, config.input_len, config.seed)
        aborts = abort_plan(config)
        gate = asyncio.Semaphore(config.max_concurrency or config.num_prompts or 1)
        arrivals = random.Random(config.seed + 2)
        start = time.perf_counter()
        tasks: list[asyncio.Task[RequestResult]] = []
        for i, prompt in enumerate(prompts):
            if tasks and math.isfinite(config.request_rate):
                await asyncio.sleep(arrivals.expovariate(config.request_rate))
            request = _Request(client, config, model, i, prompt, aborts.get(i))
            tasks.append(asyncio.create_task(request.run(gate)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return BenchResult(config, list(results), duration)


async def _first_model(client: Any) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


class _Request:
    """One streamed completion, timed chunk by chunk."""

    def __init__(
        self,
        client: Any,
        config: BenchConfig,
        model: str,
        index: int,
        prompt: str,
        abort_after: int | None,
    ) -> None:
        self.client = client
        self.body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": config.output_len,
            "temperature": config.temperature,
            "ignore_eos": config.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.abort_after = abort_after
        self.result = RequestResult(index=index, prompt=prompt)

    async def run(self, gate: asyncio.Semaphore) -> RequestResult:
        async with gate:
            start = time.perf_counter()
            try:
                await self._stream(start)
            except Exception as exc:  # a transport failure counts as a failed request
                self.result.error = f"{type(exc).__name__}: {exc}"
            self.result.latency_s = time.perf_counter() - start
        return self.result

    async def _stream(self, start: float) -> None:
        result = self.result
        async with self.client.stream("POST", "/v1/completions", json=self.body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            chunks, last = 0, start
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    result.error = str(event["error"].get("message"))
                    return
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                    if not choice.get("text"):
                        continue
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last, chunks = now, chunks + 1
                    result.text += choice["text"]
                if self.abort_after is not None and chunks >= self.abort_after:
                    result.aborted = True  # leaving the block closes the connection
                    result.output_tokens = chunks
                    return


# Command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url", default="http://localhost:8000", help="the server (default: %(default)s)"
    )
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument(
        "--num-prompts", type=int, default=100, help="requests to send (default: %(default)s)"
    )
    parser.add_argument("--input-len", type=int, default=32, help="words per random prompt")
    parser.add_argument("--output-len", type=int, default=16, help="max_tokens per request")
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second, Poisson arrivals (default: inf, all at once)",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (default: all)"
    )
    parser.add_argument(
        "--abort-fraction",
        type=float,
        default=0.0,
        help="share of requests abandoned mid-stream (0..1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompts and arrivals (default: 0)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default: greedy)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("HWLM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="Bearer key (default: $HWLM_API_KEY, else $OPENAI_API_KEY)",
    )
    parser.add_argument("--output-json", default=None, help="write the summary here")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if not 0.0 <= args.abort_fraction <= 1.0:
        raise ValueError(f"--abort-fraction must be in [0, 1], got {args.abort_fraction}")
    return BenchConfig(
        base_url=args.base_url.rstrip("/"),
        model=args.model,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        abort_fraction=args.abort_fraction,
        seed=args.seed,
        temperature=args.temperature,
        api_key=args.api_key,
    )


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    result = asyncio.run(run_benchmark(config_from_args(args)))
    summary = result.summary()
    for key, value in summary.items():
        shown = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else value
        print(f"{key:<24}{shown}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    errors = [r.error for r in result.results if r.error]
    if errors:
        print(f"{len(errors)} request(s) failed, first: {errors[0]}", file=sys.stderr)
    return 1 if errors else 0
