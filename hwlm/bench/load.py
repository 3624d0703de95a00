"""The load generator behind ``hwlm bench serve``: a workload (``BenchConfig``), its requests, and
a run against a server that returns every request's result (``BenchResult``), so that tests can
check correctness under load as well as speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hwlm.bench import datasets
from hwlm.bench.client import (
    COMPLETIONS_ENDPOINT,
    ClientSettings,
    RequestResult,
    first_model,
    open_client,
)
from hwlm.bench.client_pool import ClientPool
from hwlm.bench.datasets import BenchRequest
from hwlm.bench.dispatch import arrival_times, drive
from hwlm.bench.metrics import percentile_ms, samples, vllm_metrics

DATASETS = ("words", "random")


@dataclass
class BenchConfig:
    base_url: str
    model: str | None = None  # None: the first model of GET /v1/models
    num_prompts: int = 100
    dataset: str = "words"  # "words": random words; "random": token ids of exact lengths
    input_len: int = 32  # words per prompt ("words")
    output_len: int = 16  # max_tokens ("words")
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_input_range: tuple[int, int] | None = None  # overrides input len and ratio
    tokenizer: str | None = None  # "random": where the vocabulary (and chat text) comes from
    endpoint: str = COMPLETIONS_ENDPOINT
    request_rate: float = math.inf  # requests per second; inf: all at once
    burstiness: float = 1.0  # gamma shape of the gaps between arrivals; 1: Poisson
    max_concurrency: int | None = None
    client_processes: int = 1
    abort_fraction: float = 0.0  # this share of requests is abandoned mid-stream
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0

    def settings(self, model: str) -> ClientSettings:
        return ClientSettings(
            base_url=self.base_url,
            model=model,
            endpoint=self.endpoint,
            temperature=self.temperature,
            ignore_eos=self.ignore_eos,
            api_key=self.api_key,
            timeout_s=self.timeout_s,
        )

    def output_range(self) -> tuple[int, int]:
        if self.dataset == "words":
            return self.output_len, self.output_len
        return datasets.length_range(self.random_output_len, self.random_range_ratio)

    def input_range(self) -> tuple[int, int]:
        if self.random_input_range is not None:
            return self.random_input_range
        return datasets.length_range(self.random_input_len, self.random_range_ratio)


@dataclass
class BenchResult:
    config: BenchConfig
    results: list[RequestResult]
    duration_s: float
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self, **kwargs: Any) -> dict[str, Any]:
        """vLLM's figures (``hwlm.bench.metrics.vllm_metrics``)."""
        return vllm_metrics(self.results, self.duration_s, **kwargs)

    def summary(self) -> dict[str, Any]:
        """vLLM's figures and the short p50/p99 names (``ttft_ms_p50``, ``itl_ms_p99``, ...)."""
        values = samples(self.results)
        out = self.metrics()
        out["duration_s"] = self.duration_s
        for metric in ("ttft", "itl"):
            for q in (50, 99):
                out[f"{metric}_ms_p{q}"] = percentile_ms(values[metric], q)
        return out


def abort_plan(config: BenchConfig) -> dict[int, int]:
    """Which requests of ``config`` are abandoned, after how many content chunks."""
    output_len = config.output_range()[1]
    return datasets.abort_plan(config.num_prompts, config.abort_fraction, output_len, config.seed)


def build_requests(config: BenchConfig, model: str) -> list[BenchRequest]:
    """The workload's requests, the same for the same config and seed."""
    n, seed = config.num_prompts, config.seed
    aborts = abort_plan(config)
    outputs = datasets.output_lengths(n, config.output_range(), seed)
    prompts: list[str] | list[list[int]]
    if config.dataset == "words":
        prompts = datasets.random_prompts(n, config.input_len, seed)
        return [BenchRequest(i, p, outputs[i], None, aborts.get(i)) for i, p in enumerate(prompts)]
    vocab = datasets.vocab_size_of(model, config.tokenizer)
    ids = datasets.random_token_prompts(n, config.input_range(), vocab, seed)
    if config.endpoint != COMPLETIONS_ENDPOINT:  # chat messages are text
        tokenizer: Any = datasets.load_bench_tokenizer(model, config.tokenizer)
        texts = [tokenizer.decode(p, skip_special_tokens=True) for p in ids]
        return [BenchRequest(i, t, outputs[i], None, aborts.get(i)) for i, t in enumerate(texts)]
    return [BenchRequest(i, p, outputs[i], len(p), aborts.get(i)) for i, p in enumerate(ids)]


async def resolve_model(config: BenchConfig) -> str:
    """``config.model``, or the server's first model; either way the server must answer."""
    served = await first_model(config.settings(config.model or ""))
    return config.model or served


async def run_benchmark(
    config: BenchConfig,
    requests: list[BenchRequest] | None = None,
    pool: ClientPool | None = None,
) -> BenchResult:
    """Send the workload (``requests``, else built from ``config``) and read every stream, in
    this process or in ``pool``'s processes (a pool of ``config.client_processes`` is started
    and stopped here when none is given and more than one is asked for)."""
    own_pool = pool is None and config.client_processes > 1
    if own_pool:
        pool = ClientPool(config.client_processes).start()
    try:
        model = await resolve_model(config)
        settings = config.settings(model)
        todo = requests if requests is not None else build_requests(config, model)
        arrivals = arrival_times(len(todo), config.request_rate, config.burstiness, config.seed)
        if pool is not None:
            async with pool.running(settings):
                results, duration = await drive(todo, arrivals, config.max_concurrency, pool.submit)
        else:
            async with open_client(settings) as client:
                results, duration = await drive(todo, arrivals, config.max_concurrency, client.run)
    finally:
        if own_pool and pool is not None:
            pool.close()
    return BenchResult(config, results, duration, model)
