"""A tensor-parallel worker (ranks 1..N-1): builds its backend and its shard of the model,
joins the group, then runs what rank 0 announces until told to stop.

``run_worker`` is the entry point of both executors (a spawned process, or a Ray actor's
method). A worker exits when rank 0 says so, when a collective fails (a peer died), or by
itself when the engine process has gone: its control socket is polled at least once a second,
and each time the engine's pid (same host) and, for a spawned worker, the pipe
multiprocessing keeps to the parent, are checked.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import zmq

from hwlm.attention import AttentionMetadata, ForwardContext
from hwlm.backend import Backend, DecodeRunner
from hwlm.distributed import steps
from hwlm.distributed.parallel_state import ParallelGroup, join_group, new_store
from hwlm.engine_args import EngineArgs
from hwlm.models import CausalLM

logger = logging.getLogger(__name__)

POLL_MS = 1000  # the longest an idle worker waits before checking on the engine


@dataclass
class WorkerSpec:
    """Everything a worker needs to start (picklable: it crosses a spawn or Ray)."""

    args: EngineArgs
    rank: int
    world_size: int
    local_rank: int  # which of this host's devices (or core slices) is the worker's
    local_world_size: int
    backend_name: str  # the backend rank 0 chose (not "auto")
    dtype: str  # torch dtype name, as rank 0 resolved it
    store_host: str
    store_port: int
    control_address: str
    reply_address: str
    engine_pid: int
    engine_host: str
    log_level: int


def run_worker(spec: WorkerSpec) -> int:
    """The worker's main function; returns its exit code."""
    title = f"hwlm::tp-worker-{spec.rank}"
    _set_title(title)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: rank 0 stops the workers
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=spec.log_level, format=f"%(asctime)s %(levelname)s {title} %(name)s: %(message)s"
        )
    context = zmq.Context()
    control = context.socket(zmq.PULL)
    control.connect(spec.control_address)
    reply = context.socket(zmq.PUSH)
    reply.connect(spec.reply_address)
    try:
        try:
            backend, group, model = _start(spec)
        except Exception as exc:
            logger.debug("worker start-up failed", exc_info=exc)
            reply.send(msgspec.msgpack.encode(["error", spec.rank, _one_line(exc)]))
            return 1
        reply.send(msgspec.msgpack.encode(["ready", spec.rank]))
        return _WorkerLoop(spec, control, backend, group, model).run()
    finally:
        control.close(linger=0)
        reply.close(linger=1000)
        context.term()


def _start(spec: WorkerSpec) -> tuple[Backend, ParallelGroup, CausalLM]:
    from hwlm.config import ModelConfig, parse_dtype
    from hwlm.models.loader import load_model, resolve_model
    from hwlm.registry import select_backend

    args = spec.args
    torch.manual_seed(args.seed)
    backend = select_backend(spec.backend_name)()
    backend.bind_rank(spec.local_rank, spec.local_world_size)
    store = new_store(spec.store_host, spec.store_port, spec.world_size, is_master=False)
    group = join_group(
        backend.distributed_backend, store, spec.rank, spec.world_size, backend.device
    )
    resolved = resolve_model(args.model, args.load_format)
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    dtype = parse_dtype(spec.dtype)
    model = load_model(
        resolved, config, backend, dtype, args.load_format, args.seed, args.quantization,
        parallel=group,
    )  # fmt: skip
    backend.prepare_model(model)
    return backend, group, model


class _WorkerLoop:
    def __init__(
        self,
        spec: WorkerSpec,
        control: zmq.Socket[bytes],
        backend: Backend,
        group: ParallelGroup,
        model: CausalLM,
    ) -> None:
        self.spec = spec
        self.control = control
        self.backend = backend
        self.group = group
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.kv_caches: list[torch.Tensor] = []
        self.decode_runner: DecodeRunner | None = None
        self._poller = zmq.Poller()
        self._poller.register(control, zmq.POLLIN)
        parent = multiprocessing.parent_process()
        self._parent_fd = parent.sentinel if parent is not None else None
        if self._parent_fd is not None:
            self._poller.register(self._parent_fd, zmq.POLLIN)

    def run(self) -> int:
        while True:
            message = self._receive()
            if message is None or message[0] == steps.STOP:
                return 0
            with torch.inference_mode():
                self._handle(message)

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == steps.STEP:
            payload = torch.empty(
                steps.payload_size(message), dtype=torch.int64, device=self.backend.device
            )
            ids, pos, metadata, copies = steps.unpack_step(message, self.group.broadcast(payload))
            if copies:
                self.backend.copy_blocks(self.kv_caches, copies)
            self._forward(ids, pos, metadata)
        elif kind == steps.LOGITS:
            _, rows, hidden_size = message
            hidden = torch.empty(rows, hidden_size, dtype=self.dtype, device=self.backend.device)
            self.model.compute_logits(self.group.broadcast(hidden))
        elif kind == steps.KV_CACHE:
            _, num_blocks, block_size, dtype_name = message
            self.kv_caches, self.decode_runner = [], None  # free the last cache first
            self.kv_caches = allocate_shard_kv_cache(
                self.backend, self.model, num_blocks, block_size, getattr(torch, dtype_name)
            )
        elif kind == steps.CAPTURE:
            _, max_num_seqs, max_model_len = message
            self.decode_runner = self.backend.capture_decode(
                self.model, self.kv_caches, max_num_seqs, max_model_len
            )
        elif kind == steps.BUDGET:
            self.group.all_reduce_min(self.backend.memory_budget(float(message[1])))
        else:
            raise ValueError(f"unknown message kind {kind!r} from rank 0")

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> None:
        """The step's forward, replayed from the decode runner exactly when rank 0 replays
        its own (``ModelRunner._replays_graph``): the same header gives the same choice, so
        both run the same collectives."""
        runner = self.decode_runner
        if runner is not None and metadata.max_query_len == 1 and runner.fits(metadata.num_seqs):
            runner.run(input_ids, positions, metadata)
        else:
            self.model(input_ids, positions, ForwardContext(self.backend, self.kv_caches, metadata))

    def _receive(self) -> list[Any] | None:
        """The next message from rank 0; None when the engine has gone."""
        while True:
            events = dict(self._poller.poll(POLL_MS))
            if self.control in events:
                message: list[Any] = msgspec.msgpack.decode(self.control.recv())
                return message
            if self._engine_gone(events):
                logger.warning("the engine process has gone; worker %d exits", self.spec.rank)
                return None

    def _engine_gone(self, events: dict[Any, int]) -> bool:
        if self._parent_fd is not None and self._parent_fd in events:
            return True
        if self.spec.engine_host != socket.gethostname():
            return False  # another machine: Ray ends an actor whose owner died
        try:
            os.kill(self.spec.engine_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def allocate_shard_kv_cache(
    backend: Backend, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """This rank's KV cache: every block, for the KV heads its attention layers hold."""
    from hwlm.distributed.sharding import kv_heads_per_rank

    config = model.config
    size = 1 if model.parallel is None else model.parallel.size
    return backend.allocate_kv_cache(
        config.num_layers,
        num_blocks,
        block_size,
        kv_heads_per_rank(config, size),
        config.head_size,
        dtype,
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or repr(exc)


def _set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        pass
