"""The CPU backend: paged attention in numba, dense layers in torch."""

from __future__ import annotations

import os
import platform

import torch

from hwlm.attention import AttentionMetadata
from hwlm.backend import Backend, ProbeResult


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class CPUBackend(Backend):
    name = "cpu"
    supported_dtypes = (torch.float32,)
    preferred_dtype = torch.float32

    @classmethod
    def probe(cls) -> ProbeResult:
        cores = os.cpu_count() or 1
        return ProbeResult(True, 10, f"{platform.machine()} CPU, {cores} cores (numba kernels)")

    def memory_budget(self, memory_utilization: float) -> int:
        return int(memory_utilization * _available_memory())

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:
        flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
        keep = slot_mapping >= 0
        if not bool(keep.all()):
            key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
        flat[0].index_copy_(0, slot_mapping, key)
        flat[1].index_copy_(0, slot_mapping, value)

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        from hwlm.kernels.numba.paged_attention import paged_attention

        return paged_attention(query, kv_cache, metadata, scale)

    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs])
        dst = torch.tensor([d for _, d in pairs])
        for cache in kv_caches:
            cache[:, dst] = cache[:, src]
