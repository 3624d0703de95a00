"""A pure-torch backend over ``hwlm.kernels.reference``: slow, exact, any torch device.

Not registered for ``--device``: it is the yardstick tests compare real backends with, and the
smallest complete example of the Backend interface.
"""

from __future__ import annotations

import torch

from hwlm.attention import AttentionMetadata
from hwlm.backend import Backend, ProbeResult
from hwlm.kernels import reference


class ReferenceBackend(Backend):
    name = "reference"
    supported_dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    kv_cache_dtypes = ("auto", "bfloat16", "fp8", "fp8_e4m3")

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(True, 1, "pure torch on the CPU (for tests)")

    def memory_budget(self, memory_utilization: float) -> int:
        return int(1 << 30)

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        reference.write_kv(key, value, kv_cache, slot_mapping, k_scale, v_scale)

    def attention(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out: torch.Tensor = reference.paged_attention(
            query, kv_cache, metadata, scale, None, k_scale, v_scale
        )
        return out

    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        reference.copy_blocks(kv_caches, pairs)
