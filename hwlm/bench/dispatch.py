"""When each request of ``hwlm bench serve`` starts: its arrival time, then a free slot.

One scheduler (in the parent process) holds the arrival schedule and the concurrency limit for the
whole run; the requests themselves run in this process or in client processes
(``hwlm.bench.client_pool``). So ``--request-rate``, ``--burstiness`` and ``--max-concurrency``
are exact for the run however many processes read the streams.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

import numpy as np

from hwlm.bench.client import RequestResult
from hwlm.bench.datasets import BenchRequest

Submit = Callable[[BenchRequest, float], Awaitable[RequestResult]]


def arrival_times(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each request arrives, as ``vllm bench serve`` draws them:
    the first at 0, then gaps from a gamma distribution of shape ``burstiness`` and mean
    1/``rate`` (exponential, i.e. Poisson arrivals, for burstiness 1); all at 0 for an infinite
    rate."""
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed + 2)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(num - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num]


async def drive(
    requests: list[BenchRequest],
    arrivals: list[float],
    max_concurrency: int | None,
    submit: Submit,
) -> tuple[list[RequestResult], float]:
    """Start each request at its arrival time once fewer than ``max_concurrency`` are in flight
    (first come, first served); return the results in request order and the duration in seconds,
    from the first arrival to the last response."""
    gate = asyncio.Semaphore(max_concurrency or max(len(requests), 1))

    async def limited(request: BenchRequest) -> RequestResult:
        async with gate:
            return await submit(request, time.perf_counter())

    start = time.perf_counter()
    tasks = []
    for request, at in zip(requests, arrivals, strict=True):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(limited(request)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start
