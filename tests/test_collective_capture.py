"""Tensor-parallel ranks replay decode steps from CUDA graphs, so their collectives are recorded
into the graphs. This checks, on a GPU, what that relies on: an all-reduce of the group's NCCL
communicator (``join_group``) captured with compute around it, replayed over new inputs, gives
what the eager ops give. One rank suffices for the recording itself; several GPUs run the whole
path (the multi-GPU runs in ci/)."""

from __future__ import annotations

import pytest
import torch

from hwlm.distributed.parallel_state import ParallelGroup, join_group, new_store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_all_reduce_replays_from_a_cuda_graph() -> None:
    device = torch.device("cuda", 0)
    store = new_store("127.0.0.1", 0, 1, is_master=True)
    group = join_group("nccl", store, 0, 1, device)
    try:
        _capture_and_replay(group, device)
    finally:
        group.abort()


def _capture_and_replay(group: ParallelGroup, device: torch.device) -> None:
    weight = torch.randn(64, 64, device=device)
    static_in = torch.zeros(8, 64, device=device)

    def step() -> torch.Tensor:
        return group.all_reduce(static_in @ weight) * 2

    step()  # warm-up outside the capture, as DecodeGraphs does
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for seed in range(3):
        x = torch.randn(8, 64, device=device, generator=torch.Generator(device).manual_seed(seed))
        static_in.copy_(x)
        graph.replay()
        torch.cuda.synchronize(device)
        torch.testing.assert_close(static_out, (x @ weight) * 2)
