"""Where each engine core of ``--data-parallel-size N`` runs.

On GPUs, core ``i`` sees only its own devices: ``CUDA_VISIBLE_DEVICES`` (``HIP_VISIBLE_DEVICES``
on ROCm) set to the ``i``-th group of ``tensor_parallel_size`` devices of those this process may
use, so that every core's backend finds its devices at index 0.. as a single engine does. On the
CPU (and the backends that run on host memory), the cores split the cores this process may use:
core ``i`` gets ``cores // N`` of them as its CPU affinity and as its torch/OpenMP thread count,
so that the replicas do not fight over the same cores. A plugin backend is left alone.

The parent plans (``plan_placements``, never touching a device runtime); each core applies its
placement first thing in its own process (``CorePlacement.apply``), before any device is used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hwlm.engine_args import EngineArgs

logger = logging.getLogger(__name__)

GPU_VISIBILITY = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES"}
HOST_BACKENDS = frozenset({"cpu", "reference", "triton-interpret"})  # run on host memory
BASE_TITLE = "hwlm::engine"


@dataclass(frozen=True)
class CorePlacement:
    """One engine core's place: its index among ``count``, environment and CPU affinity."""

    index: int = 0
    count: int = 1
    env: tuple[tuple[str, str], ...] = ()
    cpus: tuple[int, ...] = ()  # empty: the parent's affinity, unchanged

    @property
    def title(self) -> str:
        """The process title: ``hwlm::engine`` alone, ``hwlm::engine<i>`` among several."""
        return BASE_TITLE if self.count == 1 else f"{BASE_TITLE}{self.index}"

    def apply(self) -> None:
        """Take this place (in the core's own process, before any device is touched)."""
        os.environ.update(dict(self.env))
        if self.cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.cpus)
        if self.cpus:
            import torch

            torch.set_num_threads(len(self.cpus))


def plan_placements(args: EngineArgs, count: int) -> list[CorePlacement]:
    """A placement per core; ValueError (one line) when the machine cannot give ``count``
    cores their share."""
    if count < 1:
        raise ValueError(f"data_parallel_size must be at least 1, got {count}")
    if count == 1:
        return [CorePlacement()]
    kind = _backend_name(args.device)
    if kind in GPU_VISIBILITY:
        return _gpu_placements(kind, count, int(getattr(args, "tensor_parallel_size", 1)))
    if kind in HOST_BACKENDS:
        return _cpu_placements(count)
    logger.warning("device %s: the %d engine cores share its devices", kind, count)
    return [CorePlacement(i, count) for i in range(count)]


def _backend_name(device: str) -> str:
    from hwlm.registry import select_backend

    return select_backend(device).name


def _gpu_placements(kind: str, count: int, tp: int) -> list[CorePlacement]:
    variable = GPU_VISIBILITY[kind]
    listed = os.environ.get(variable)
    if listed is not None:
        devices = [d.strip() for d in listed.split(",") if d.strip()]
    else:
        devices = [str(i) for i in range(_gpu_count(kind) or count * tp)]
    need = count * tp
    if len(devices) < need:
        raise ValueError(
            f"data_parallel_size {count} x tensor_parallel_size {tp} needs {need} {kind} "
            f"devices, this process sees {len(devices)}"
        )
    return [
        CorePlacement(i, count, ((variable, ",".join(devices[i * tp : (i + 1) * tp])),))
        for i in range(count)
    ]


def _gpu_count(kind: str) -> int | None:
    """The GPUs the driver reports, without initialising CUDA here; None: unknown."""
    if kind != "cuda":
        return None
    from hwlm.backends.cuda import _nvidia_gpus

    return len(_nvidia_gpus()) or None


def _cpu_placements(count: int) -> list[CorePlacement]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        cpus = list(range(os.cpu_count() or 1))
    share = len(cpus) // count
    if share < 1:
        raise ValueError(
            f"data_parallel_size {count} needs at least {count} CPU cores, this process may "
            f"use {len(cpus)}"
        )
    placements = []
    for i in range(count):
        mine = tuple(cpus[i * share : (i + 1) * share])
        env = (("OMP_NUM_THREADS", str(share)),)
        placements.append(CorePlacement(i, count, env, mine))
    return placements
