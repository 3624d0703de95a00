"""The cpu backend with a decode runner that does what CUDA graphs do, without graphs: the
static buffers, padding and per-size forward of ``PaddedDecodeRunner``, each replay run eagerly
and logged. It lets the CPU tests check that every tensor-parallel rank captures the same sizes
and replays the same one for each decode step (``tests/test_tensor_parallel.py``).

Each process appends the sizes it captured ("capture N") and replayed ("replay N") to its own
file in the folder named by ``HWLM_TEST_REPLAY_LOG``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from hwlm.backend import DecodeRunner, ProbeResult
from hwlm.backends.cpu import CPUBackend
from hwlm.backends.cuda_graphs import PaddedDecodeRunner

LOG_FOLDER = "HWLM_TEST_REPLAY_LOG"


def _log(line: str) -> None:
    folder = os.environ[LOG_FOLDER]
    with open(os.path.join(folder, f"{os.getpid()}.log"), "a") as out:
        out.write(line + "\n")


class EagerReplay(PaddedDecodeRunner):
    def capture(self) -> EagerReplay:
        with torch.inference_mode():
            for size in reversed(self.sizes):  # as DecodeGraphs captures: collectives pair up
                self._forward(size)
                _log(f"capture {size}")
        return self

    def _replay(self, size: int) -> torch.Tensor:
        _log(f"replay {size}")
        return self._forward(size)


class ReplayingCPUBackend(CPUBackend):
    name = "cpu-replay"

    @classmethod
    def probe(cls) -> ProbeResult:
        found = CPUBackend.probe()  # never the choice of --device auto
        return ProbeResult(found.available, 0, "test plugin: " + found.reason)

    def capture_decode(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
    ) -> DecodeRunner | None:
        return EagerReplay(model, self, kv_caches, max_num_seqs, max_model_len).capture()
