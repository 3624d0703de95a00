"""Rank 0's side of tensor parallelism: it lives in the engine process, beside the scheduler.

``start_executor`` starts ranks 1..N-1 (``executor_mp``: spawned processes; ``executor_ray``:
Ray actors in a placement group), joins the group with them and returns the ``Executor`` the
engine drives them through. Per step it sends one message and one broadcast
(``hwlm.distributed.steps``); only rank 0 samples. A watchdog thread follows the workers: one
that dies is logged, the group is aborted (so that no collective waits on it), and the next
call fails with a one-line error naming the rank.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

from hwlm.attention import AttentionMetadata
from hwlm.backend import Backend
from hwlm.distributed import steps
from hwlm.distributed.parallel_state import (
    COLLECTIVE_TIMEOUT_S,
    ParallelGroup,
    join_group,
    new_store,
)
from hwlm.distributed.worker import WorkerSpec
from hwlm.engine_args import EngineArgs
from hwlm.models import CausalLM

logger = logging.getLogger(__name__)

STOP_WAIT_S = 10.0  # how long stopped workers get to exit before they are killed


class WorkerDied(RuntimeError):
    """A tensor-parallel worker ended while the engine needed it."""


class Workers(Protocol):
    """The started workers, as an executor (mp or Ray) holds them."""

    def wait_for_exit(self, timeout: float) -> str | None:
        """Block up to ``timeout`` seconds; a line describing a worker that has ended, or None."""
        ...

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the workers to exit, then kill those left; idempotent."""
        ...


Launcher = Callable[[list[WorkerSpec]], Workers]


class Executor:
    """Drives ranks 1..N-1 from rank 0: each call here is mirrored by every worker."""

    def __init__(
        self,
        group: ParallelGroup,
        control: steps.ControlSender,
        workers: Workers,
        ready: set[int],
        host_share: _HostShare,
    ) -> None:
        self.group = group
        self._control = control
        self._workers = workers
        self._ready = ready  # the ranks that reported their shard loaded
        self._death = _Death()
        self._stopped = threading.Event()
        # The thread holds no reference to the executor, so that dropping the engine stops
        # the workers (the finalizer below) without a shutdown call.
        watch = (workers, group, self._stopped, self._death)
        threading.Thread(target=_watch, args=watch, name="hwlm-tp-watchdog", daemon=True).start()
        self._finalizer = weakref.finalize(
            self, _shutdown, control, workers, self._stopped, host_share
        )
        # At exit, before what the launcher registered earlier (Ray's own shutdown) runs.
        atexit.register(self._finalizer)

    # What the engine calls ------------------------------------------------------------------

    def send_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        copies: list[tuple[int, int]],
    ) -> None:
        """Have every worker copy ``copies`` and run the forward on these inputs (rank 0 runs
        its own right after)."""
        self.check_alive()
        header, payload = steps.pack_step(input_ids, positions, metadata, copies)
        self._send(header)
        self.group.broadcast(payload)

    def compute_logits(self, model: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
        """``model.compute_logits(hidden)`` with the workers computing their vocabulary slices."""
        self.check_alive()
        hidden = hidden.contiguous()
        self._send([steps.LOGITS, int(hidden.shape[0]), int(hidden.shape[1])])
        self.group.broadcast(hidden)
        return model.compute_logits(hidden)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        """Have every worker allocate its shard of a ``num_blocks`` cache of ``dtype``."""
        self.check_alive()
        name = str(dtype).removeprefix("torch.")
        self._send([steps.KV_CACHE, num_blocks, block_size, name])

    def capture_decode(self, max_num_seqs: int, max_model_len: int) -> None:
        """Have every worker capture its backend's decode runner over its cache, as rank 0
        does next with its own: the captures run collectives, so every rank captures the
        same batch sizes in the same order, and later replays the same one for a step."""
        self.check_alive()
        self._send([steps.CAPTURE, max_num_seqs, max_model_len])

    def min_memory_budget(self, budget: int, memory_utilization: float) -> int:
        """The smallest KV budget over the ranks (rank 0's is ``budget``): every rank holds
        the same blocks."""
        self.check_alive()
        self._send([steps.BUDGET, memory_utilization])
        return self.group.all_reduce_min(budget)

    def wait_until_loaded(self) -> None:
        """Wait for every worker to report its shard loaded (rank 0 loads its own meanwhile);
        a worker's start-up error, or its death, is raised here as one line."""
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT_S
        while len(self._ready) < self.group.size - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensor-parallel workers did not load the model within "
                    f"{COLLECTIVE_TIMEOUT_S:.0f} s"
                )
            _poll_startup(self._control, self._workers, self._ready, timeout_ms=200)

    def _send(self, message: list[Any]) -> None:
        if not self._control.send(message):
            raise WorkerDied(
                "a tensor-parallel worker is no longer connected; the engine cannot continue"
            )

    def check_alive(self) -> None:
        if self._death.message is not None:
            raise WorkerDied(self._death.message)

    def shutdown(self) -> None:
        """Stop the workers (killing those that do not exit in time); idempotent."""
        self._finalizer()


class _Death:
    message: str | None = None  # set by the watchdog: which worker ended, and how


def _watch(workers: Workers, group: ParallelGroup, stopped: threading.Event, death: _Death) -> None:
    """The watchdog: note the first worker that ends, and abort the group."""
    while not stopped.is_set():
        try:
            ended = workers.wait_for_exit(1.0)
        except Exception as exc:  # Ray gone (shut down, or its cluster lost)
            ended = "workers unreachable: " + " ".join(str(exc).split())[:200]
        if ended is None or stopped.is_set():
            continue
        death.message = f"tensor-parallel {ended}; the engine cannot continue"
        logger.error("%s", death.message)
        group.abort()  # a collective waiting on it fails now, not after the timeout
        return


def _shutdown(
    control: steps.ControlSender,
    workers: Workers,
    stopped: threading.Event,
    host_share: _HostShare,
) -> None:
    if stopped.is_set():
        return
    stopped.set()
    try:
        control.send([steps.STOP])
    finally:
        workers.stop(STOP_WAIT_S)
        control.close()
        host_share.restore()


class _HostShare:
    """This process's cores and torch threads before rank 0 took its share (``bind_rank``),
    given back when the workers stop: the engine process may live on (an ``LLM`` in a
    program, a test session)."""

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()
        self.cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def restore(self) -> None:
        torch.set_num_threads(self.threads)
        if self.cores is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.cores)


def start_executor(
    args: EngineArgs, backend: Backend, dtype: torch.dtype, launcher_name: str
) -> Executor:
    """Start ranks 1..N-1 with the launcher ``launcher_name`` ("mp" or "ray"), bind rank 0 to
    its device and join the group with them. Raises one clear error when a worker cannot start
    or the group cannot form."""
    world = args.tensor_parallel_size
    launch, host, local = _launcher(launcher_name)
    store = new_store(host, 0, world, is_master=True)
    control = steps.ControlSender(host, world - 1)
    specs = [
        WorkerSpec(
            args=args,
            rank=rank,
            world_size=world,
            local_rank=rank if local else 0,
            local_world_size=world if local else 1,
            backend_name=backend.name,
            dtype=str(dtype).removeprefix("torch."),
            store_host=host,
            store_port=store.port,
            control_address=control.addresses[rank - 1],
            reply_address=control.reply_address,
            engine_pid=os.getpid(),
            engine_host=socket.gethostname(),
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        for rank in range(1, world)
    ]
    start = time.perf_counter()
    try:
        workers = launch(specs)
    except Exception:
        control.close()
        raise
    ready: set[int] = set()
    host_share = _HostShare()
    try:
        backend.bind_rank(0, world if local else 1)  # after the spawn: children inherit it
        group = _join(backend, store, world, workers, control, ready)
    except BaseException:
        workers.stop(0.0)
        control.close()
        host_share.restore()
        raise
    logger.info(
        "tensor parallel: %d ranks (%s, %s) joined in %.1f s",
        world,
        launcher_name,
        backend.distributed_backend,
        time.perf_counter() - start,
    )
    return Executor(group, control, workers, ready, host_share)


def _join(
    backend: Backend,
    store: Any,
    world: int,
    workers: Workers,
    control: steps.ControlSender,
    ready: set[int],
) -> ParallelGroup:
    """Join the group in a thread while watching the workers: one that fails before it joins
    ends the wait with its error, not after the store's timeout."""
    result: list[ParallelGroup | BaseException] = []

    def join() -> None:
        try:
            kind = backend.distributed_backend
            result.append(join_group(kind, store, 0, world, backend.device))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=join, name="hwlm-tp-join", daemon=True)
    thread.start()
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT_S
    while thread.is_alive() and time.monotonic() < deadline:
        _poll_startup(control, workers, ready, timeout_ms=200)
        thread.join(0.05)
    if not result:
        raise RuntimeError(
            f"tensor-parallel workers did not join the group within {COLLECTIVE_TIMEOUT_S:.0f} s"
        )
    joined = result[0]
    if isinstance(joined, BaseException):
        raise RuntimeError(
            f"tensor parallel: the {backend.distributed_backend} group could not form: "
            + " ".join(str(joined).split())
        ) from joined
    return joined


def _poll_startup(
    control: steps.ControlSender, workers: Workers, ready: set[int], timeout_ms: int
) -> None:
    """Note a worker that reports ready in ``ready``; raise one that reports a start-up error,
    or that has died, as one line."""
    reply = control.receive_reply(timeout_ms)
    if reply is not None and reply[0] == "error":
        raise RuntimeError(f"tensor-parallel worker rank {reply[1]} failed to start: {reply[2]}")
    if reply is not None and reply[0] == "ready":
        ready.add(int(reply[1]))
    ended = workers.wait_for_exit(0.0)
    if ended is not None:
        raise RuntimeError(f"tensor-parallel {ended} during start-up")


def _launcher(name: str) -> tuple[Launcher, str, bool]:
    """The launcher, the address rank 0 listens on, and whether all ranks share this host."""
    if name == "mp":
        from hwlm.distributed.executor_mp import launch_processes

        return launch_processes, "127.0.0.1", True
    if name == "ray":
        from hwlm.distributed.executor_ray import launch_actors, node_address

        return launch_actors, node_address(), False
    raise ValueError(f"unknown distributed_executor_backend {name!r}; expected mp or ray")
