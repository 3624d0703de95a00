"""The cuda backend's Triton kernels run on CPU tensors by Triton's interpreter.

For CI without a GPU: ``TRITON_INTERPRET=1 pytest tests/conformance --device triton-interpret
--quick`` checks the kernels' logic (indexing, masking, online softmax) on any machine. It is slow
and never chosen by ``--device auto``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from hwlm.backend import Backend, DecodeRunner, ProbeResult, StepRunner
from hwlm.engine.transfer import HostCopy

from .cuda import CUDABackend


class TritonInterpreterBackend(CUDABackend):
    """The cuda backend's kernels with the CPU's device policy: the interpreter runs them on the
    host, synchronously, on tensors in ordinary memory."""

    name = "triton-interpret"
    overlap_steps = False
    profile_memory_with_warm_up = False

    def __init__(self) -> None:
        super().__init__()
        self.device = torch.device("cpu")
        self._num_sms = 4  # the interpreter has no multiprocessors; any count exercises splits

    @classmethod
    def probe(cls) -> ProbeResult:
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ProbeResult(
                False, 0, "set TRITON_INTERPRET=1 to run the Triton kernels on the CPU"
            )
        if importlib.util.find_spec("triton") is None:
            return ProbeResult(False, 0, "triton is not installed")
        return ProbeResult(
            True, 1, "Triton kernels under Triton's CPU interpreter (slow; for tests)"
        )

    def memory_budget(self, memory_utilization: float) -> int:
        return int(memory_utilization * (512 << 20))

    def capture_decode(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
    ) -> DecodeRunner | None:
        return None  # CUDA graphs need a GPU; every step runs eagerly

    def capture_steps(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        token_sizes: tuple[int, ...],
    ) -> StepRunner | None:
        return None  # as capture_decode: no graphs without a GPU

    def synchronize(self) -> None:
        return None

    def default_max_num_batched_tokens(self, offline: bool) -> int:
        return Backend.default_max_num_batched_tokens(self, offline)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return Backend.upload(self, host)

    def start_host_copy(self, tensors: list[torch.Tensor]) -> HostCopy:
        return Backend.start_host_copy(self, tensors)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return Backend.host_buffer(self, shape, dtype)
