"""DataParallelEngineClient: N engine cores behind one API process (``--data-parallel-size N``).

Each core is a whole engine (scheduler, KV cache, its own devices: ``hwlm.engine.dp_placement``)
in its own process, reached through its own ``MultiProcessEngineClient``. This client sends each
new request to one core (``DataParallelBalancer``: by load, preferring the core that holds the
prompt's prefix); the request's stream belongs to that core's client, so its deltas, errors and
abort stay with its core. It offers the ``MultiProcessEngineClient`` surface the server's seam
uses, with the cores' stats merged (``hwlm.engine.dp_stats``) and each core's kept too (per-core
metrics).

Failures: a core that dies fails its own in-flight requests (its client's ``EngineDeadError``);
from then on the whole client is unhealthy (``/health`` 503) and refuses new requests, while
the other cores finish what they run. Restarting a core is left to whoever restarts the server.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from multiprocessing.connection import Connection

from hwlm.engine.client_mp import START_TIMEOUT, MultiProcessEngineClient, _EngineProcess
from hwlm.engine.client_stream import EngineDeadError, EngineStartupError, RequestStream
from hwlm.engine.dp_balancer import DataParallelBalancer
from hwlm.engine.dp_placement import plan_placements
from hwlm.engine.dp_stats import merge_serving, merge_stats
from hwlm.engine.messages import EngineInfo, EngineStats
from hwlm.engine.serving_metrics import MetricsSnapshot
from hwlm.engine.stream_table import num_samples
from hwlm.engine_args import EngineArgs
from hwlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class DataParallelEngineClient:
    """Clients of ``len(clients)`` engine cores, used as one (it owns and shuts them down)."""

    def __init__(self, clients: Sequence[MultiProcessEngineClient], prefix_aware: bool = True):
        if not clients:
            raise ValueError("a data-parallel client needs at least one engine core")
        self.clients = list(clients)
        self.info: EngineInfo = clients[0].info
        self.balancer = DataParallelBalancer(
            len(clients),
            self.info.block_size,
            [c.info.num_kv_blocks for c in clients],
            prefix_aware=prefix_aware,
        )

    @classmethod
    def start(
        cls, args: EngineArgs, count: int, *, start_timeout: float = START_TIMEOUT
    ) -> DataParallelEngineClient:
        """Start ``count`` engine cores for ``args`` (all loading at once) and wait until each
        is ready. A bad setting raises ValueError; another failure ``EngineStartupError``,
        naming the core. Either way no core is left running."""
        placements = plan_placements(args, count)
        engines = [_EngineProcess(args, placement) for placement in placements]
        clients: list[MultiProcessEngineClient] = []
        try:
            for index, engine in enumerate(engines):
                clients.append(_handshake(index, count, engine, start_timeout))
        except BaseException:
            for client in clients:
                client.shutdown(timeout=5)
            for engine in engines[len(clients) + 1 :]:  # the failed one cleaned up after itself
                engine.stop(0)
                engine.close()
            raise
        return cls(clients)

    @classmethod
    def connect(
        cls,
        addresses: Sequence[tuple[str, str]],
        client_index: int,
        lifelines: Sequence[Connection],
        *,
        start_timeout: float = START_TIMEOUT,
    ) -> DataParallelEngineClient:
        """Clients of cores another process started (``--api-server-count``): per core its
        (input, output) addresses and lifeline, as ``MultiProcessEngineClient.connect``."""
        clients: list[MultiProcessEngineClient] = []
        try:
            for (input_address, output_address), lifeline in zip(addresses, lifelines, strict=True):
                clients.append(
                    MultiProcessEngineClient.connect(
                        input_address,
                        output_address,
                        client_index,
                        lifeline,
                        start_timeout=start_timeout,
                    )
                )
        except BaseException:
            for client in clients:
                client.shutdown(timeout=0)
            raise
        return cls(clients)

    # Requests ---------------------------------------------------------------------------------

    @property
    def client_index(self) -> int:
        return self.clients[0].client_index

    @property
    def pid(self) -> int:
        """The first core's process id (``pids`` has them all)."""
        return self.info.pid

    @property
    def pids(self) -> list[int]:
        return [c.info.pid for c in self.clients]

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        stream: bool = True,
        arrival_time: float | None = None,
        priority: int = 0,
        group: str | None = None,
    ) -> RequestStream:
        """As ``EngineClient.add_request``, on the core the balancer picks. Refused
        (``EngineDeadError``) once any core has died."""
        self._raise_if_dead()
        stats = [c.stats_snapshot() for c in self.clients]
        core = self.balancer.choose(stats, prompt_token_ids)
        self.balancer.sent(core, num_samples(params), prompt_token_ids)
        return await self.clients[core].add_request(
            request_id,
            prompt_token_ids,
            params,
            stream=stream,
            arrival_time=arrival_time,
            priority=priority,
            group=group,
        )

    async def abort(self, request_id: str) -> None:
        for client in self.clients:  # only the core that runs it knows the id
            await client.abort(request_id)

    # State ------------------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        """True while every core runs."""
        return all(c.is_healthy() for c in self.clients)

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why a core is dead (the first found, named); None while all are healthy."""
        for index, client in enumerate(self.clients):
            error = client.dead_error
            if error is not None:
                return EngineDeadError(f"engine core {index}: {error}")
        return None

    def core_stats(self) -> list[EngineStats]:
        """Each core's stats as last reported (a dead core's gauges read 0)."""
        return [c.stats_snapshot() for c in self.clients]

    def stats_snapshot(self) -> EngineStats:
        """The cores' stats merged: the sums, and KV usage over all their blocks."""
        return merge_stats(self.core_stats())

    def serving_snapshot(self) -> MetricsSnapshot:
        return merge_serving([c.serving_snapshot() for c in self.clients])

    def num_unfinished_requests(self) -> int:
        return sum(c.num_unfinished_requests() for c in self.clients)

    def num_waiting_sequences(self) -> int:
        return sum(c.num_waiting_sequences() for c in self.clients)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every core (all told at once, then each waited for up to ``timeout``)."""
        for client in self.clients:
            client.shutdown(timeout=0)
        if timeout > 0:
            for client in self.clients:
                client.shutdown(timeout)

    def _raise_if_dead(self) -> None:
        error = self.dead_error
        if error is not None:
            raise EngineDeadError(str(error))


def _handshake(
    index: int, count: int, engine: _EngineProcess, start_timeout: float
) -> MultiProcessEngineClient:
    """The client of one started core, once it is ready; its errors name the core."""
    try:
        return MultiProcessEngineClient(_engine=engine, start_timeout=start_timeout)
    except ValueError as exc:
        raise ValueError(f"engine core {index} of {count}: {exc}") from exc
    except EngineStartupError as exc:
        raise EngineStartupError(f"engine core {index} of {count}: {exc}") from exc
