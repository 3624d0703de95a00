"""One tensor-parallel group: this process's rank, the group's size, and the collectives the
parallel layers use, on a torch.distributed process group.

The process group is built directly from a ``TCPStore`` (``ProcessGroupGloo`` /
``ProcessGroupNCCL``), not through ``init_process_group``: nothing is registered process-wide,
so several engines (data-parallel replicas, or LLMs created one after another in one process)
each own their group. Which library runs the collectives (gloo on CPUs, nccl on NVIDIA GPUs) is
the backend's ``distributed_backend``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# How long a collective may wait for the other ranks before it fails: a backstop against a hang
# (a dead peer over gloo fails at once; the executor's watchdog aborts nccl's group).
COLLECTIVE_TIMEOUT_S = 300.0


@dataclass
class ParallelGroup:
    """``size`` ranks that each hold a shard of the model; ``rank`` 0 drives the steps."""

    rank: int
    size: int
    process_group: Any  # a ProcessGroupGloo / ProcessGroupNCCL (torch's c10d backends)
    store: Any  # the TCPStore, kept alive as long as the group
    device: torch.device  # where this rank's collectives run (nccl: its GPU)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        self._wait(self.process_group.allreduce([tensor]))
        return tensor

    def all_reduce_min(self, value: int) -> int:
        """The smallest ``value`` of all ranks."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp(dist.ReduceOp.MIN)
        self._wait(self.process_group.allreduce([tensor], options))
        return int(tensor.item())

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along the last dimension, in rank order."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._wait(self.process_group.allgather([parts], [tensor]))
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (in place); returns it."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._wait(self.process_group.broadcast([tensor], options))
        return tensor

    def _wait(self, work: Any) -> None:
        try:
            work.wait()
        except RuntimeError as exc:  # gloo: a peer's sockets closed; nccl: aborted, timed out
            raise RuntimeError(
                f"tensor-parallel collective failed on rank {self.rank} of {self.size} (a rank "
                f"died or timed out): {' '.join(str(exc).split())[:200]}"
            ) from exc

    def abort(self) -> None:
        """Make collectives waiting on a dead peer fail now (where the library can)."""
        abort = getattr(self.process_group, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # already torn down, or not supported by this library
                pass


def new_store(host: str, port: int, world_size: int, is_master: bool) -> Any:
    """Rank 0's store (``port`` 0: a free port, read back from ``.port``), or a client of it."""
    return dist.TCPStore(  # type: ignore[attr-defined]
        host,
        port,
        world_size,
        is_master,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        wait_for_workers=False,
    )


def join_group(
    kind: str, store: Any, rank: int, world_size: int, device: torch.device
) -> ParallelGroup:
    """Join the group of ``world_size`` ranks that meet at ``store``; blocks until all have.
    ``kind``: "gloo" or "nccl" (``Backend.distributed_backend``)."""
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    prefixed = dist.PrefixStore("hwlm-tp", store)  # type: ignore[attr-defined]
    if kind == "gloo":
        group: Any = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    elif kind == "nccl":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise RuntimeError("this PyTorch build has no NCCL (torch.distributed nccl)")
        options = nccl.Options()
        options._timeout = timeout
        group = nccl(prefixed, rank, world_size, options)
        # Connect now, on this rank's GPU: a missing peer fails here, not in the first step.
        group.allreduce([torch.zeros(1, device=device)]).wait()
    else:
        raise ValueError(f"unknown distributed backend {kind!r}; expected gloo or nccl")
    return ParallelGroup(rank, world_size, group, store, device)
