"""The Ray executor (``distributed_executor_backend="ray"``): ranks 1..N-1 as Ray actors,
placed by one placement group (one bundle per worker: a GPU on GPU backends, a CPU otherwise),
so that a group can span the machines of a Ray cluster. Rank 0 stays in the engine process.

An existing Ray connection is used as it is; otherwise ``ray.init()`` joins the cluster named by
``RAY_ADDRESS`` or starts a local one (what the tests do), which is shut down with the workers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hwlm.distributed.worker import WorkerSpec, run_worker

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # for the placement group's resources


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(
            "distributed_executor_backend 'ray' needs Ray: pip install 'hwlm[distributed]'"
        ) from exc
    return ray


def node_address() -> str:
    """This node's address in the Ray cluster (started here when none is connected)."""
    ray = _ray()
    _connect(ray)
    return str(ray.util.get_node_ip_address())


def _connect(ray: Any) -> None:
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = max(2, os.cpu_count() or 1)  # logical: workers take one each
    ray.init(**kwargs)
    _connect.started_here = True  # type: ignore[attr-defined]


class _RayWorker:
    """The actor: ``run`` is the worker's whole life (returns its exit code)."""

    def run(self, spec: WorkerSpec) -> int:
        return run_worker(spec)


class ActorWorkers:
    def __init__(self, ray: Any, actors: list[Any], runs: list[Any], group: Any) -> None:
        self._ray = ray
        self._actors = actors
        self._runs = runs  # each actor's ``run`` result: ready when the worker has ended
        self._group = group
        self._stopped = False

    def wait_for_exit(self, timeout: float) -> str | None:
        done, _ = self._ray.wait(self._runs, num_returns=1, timeout=timeout)
        if not done:
            return None
        rank = self._runs.index(done[0]) + 1
        try:
            code = self._ray.get(done[0])
            how = f"exited ({code})"
        except Exception as exc:  # the actor died (killed, or its node went)
            how = "died: " + " ".join(str(exc).split())[:200]
        return f"worker rank {rank} (Ray actor) {how}"

    def stop(self, timeout: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        ray = self._ray
        _, running = ray.wait(self._runs, num_returns=len(self._runs), timeout=timeout)
        for actor in self._actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self._group)
        if getattr(_connect, "started_here", False):
            ray.shutdown()
            _connect.started_here = False  # type: ignore[attr-defined]


def launch_actors(specs: list[WorkerSpec]) -> ActorWorkers:
    ray = _ray()
    _connect(ray)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpus = specs[0].backend_name not in ("cpu", "reference", "triton-interpret")
    bundle = {"GPU": 1.0} if gpus else {"CPU": 1.0}
    group = ray.util.placement_group([dict(bundle) for _ in specs], strategy="PACK")
    try:
        ray.get(group.ready(), timeout=READY_TIMEOUT_S)
    except Exception as exc:
        ray.util.remove_placement_group(group)
        raise RuntimeError(
            f"Ray could not place {len(specs)} tensor-parallel workers ({bundle} each) within "
            f"{READY_TIMEOUT_S:.0f} s: {' '.join(str(exc).split())[:200]}"
        ) from exc
    actor_class = ray.remote(num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0)(_RayWorker)
    actors = [
        actor_class.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=i
            ),
            name=None,
        ).remote()
        for i in range(len(specs))
    ]
    runs = [actor.run.remote(spec) for actor, spec in zip(actors, specs, strict=True)]
    logger.info("tensor parallel: %d Ray actors placed", len(actors))
    return ActorWorkers(ray, actors, runs, group)
