"""The CPU backend: float32 paged attention and KV-cache writes as numba kernels.

The kernels (and numba) are imported when a backend is created, not when this module is, so that
probing devices stays cheap.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import TYPE_CHECKING

import torch

from hwlm.attention import AttentionMetadata
from hwlm.backend import Backend, ProbeResult, QuantizedLinear

if TYPE_CHECKING:
    from hwlm.models.quantized_weight import PrequantizedWeight

logger = logging.getLogger(__name__)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _limit_numba_pool(threads: int) -> None:
    """Start numba's OpenMP pool (at its first kernel) with only ``threads`` threads: a larger
    pool's idle threads spin on the cores of the other ranks, and every collective waits for
    the slowest rank (a 2-rank C1-like model on 2 cores ran 17x slower with numba's default)."""
    import numba
    from numba.np.ufunc import parallel

    if getattr(parallel, "_is_initialized", False):
        logger.warning("numba's threads were started before this rank was bound; ranks may compete")
        return
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    numba.config.reload_config()  # type: ignore[no-untyped-call]
    parallel.NUM_THREADS = threads  # read from the config when numba was imported


class CPUBackend(Backend):
    name = "cpu"
    supported_dtypes = (torch.float32,)
    quantizations = ("int8", "int4")  # through ONNX Runtime (backends/cpu_quant.py)
    # bfloat16 caches hold the bits in int16 for numba, which widens them with a shift while it
    # reads them: half the bytes of float32, so decode attention (memory-bound) runs ~1.6x
    # faster. No fp8 cache: numba has no float8 type, and dequantizing whole caches in torch
    # before every attention call would cost more than the smaller cache saves.
    kv_cache_dtypes = ("auto", "bfloat16")

    def __init__(self) -> None:
        super().__init__()
        from hwlm.kernels import numba as kernels

        self._kernels = kernels

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(True, 10, f"{_usable_cores()} cores of {_cpu_name()}")

    def memory_budget(self, memory_utilization: float) -> int:
        """``memory_utilization`` of the available RAM, capped at HWLM_CPU_KVCACHE_SPACE GiB
        (default 4, like vLLM's VLLM_CPU_KVCACHE_SPACE): on a CPU the KV cache shares memory
        with everything else, so it does not take all of it by default."""
        cap = float(os.environ.get("HWLM_CPU_KVCACHE_SPACE", "4")) * 2**30
        return int(min(memory_utilization * _available_memory(), cap))

    def bind_rank(self, local_rank: int, local_world_size: int) -> None:
        """Each rank takes its own slice of the usable cores (affinity, and as many torch
        threads, which the numba kernels follow)."""
        if local_world_size <= 1:
            return
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        per_rank = max(1, (len(cores) or os.cpu_count() or 1) // local_world_size)
        mine = cores[local_rank * per_rank : (local_rank + 1) * per_rank]
        if mine and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, mine)
        torch.set_num_threads(per_rank)
        _limit_numba_pool(per_rank)
        logger.info("cpu rank %d: cores %s, %d threads", local_rank, mine or "any", per_rank)

    def prepare_model(self, model: torch.nn.Module) -> None:
        from .cpu_linear import pack_linear_layers

        packed = pack_linear_layers(model)
        logger.info("cpu: %d dense layers repacked for oneDNN", packed)

    def quantized_linear(
        self, weight: torch.Tensor, bias: torch.Tensor | None, method: str
    ) -> QuantizedLinear:
        from .cpu_quant import quantized_linear

        return quantized_linear(weight, bias, method)

    def prequantized_linear(
        self, weight: PrequantizedWeight, bias: torch.Tensor | None
    ) -> QuantizedLinear:
        from .cpu_prequantized import prequantized_linear

        return prequantized_linear(weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out: torch.Tensor = self._kernels.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps)
        return out.view(x.shape)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._kernels.silu_and_mul(x.reshape(-1, x.shape[-1]))
        return out.view(*x.shape[:-1], x.shape[-1] // 2)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = x.shape[-1]
        normed, total = self._kernels.add_rms_norm(
            x.reshape(-1, width), residual.reshape(-1, width), weight, eps
        )
        return normed.view(x.shape), total.view(x.shape)

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_out, k_out = self._kernels.rotary(q, k, cos, sin)
        return q_out, k_out

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,  # never given: kv_cache_dtypes has no fp8
        v_scale: torch.Tensor | None = None,
    ) -> None:
        self._kernels.write_kv(key, value, kv_cache, slot_mapping)

    def attention(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out: torch.Tensor = self._kernels.paged_attention(query, kv_cache, metadata, scale)
        return out

    def greedy_sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logprobs = self._kernels.greedy_sample(logits)
        if bool(logprobs.isnan().any()):  # NaN or +inf logits: torch's own answer for those
            return super().greedy_sample(logits)
        return tokens, logprobs

    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long)
        if set(src.tolist()) & set(dst.tolist()):  # a chain: copy in order, as the reference does
            for cache in kv_caches:
                for s, d in pairs:
                    cache[:, d] = cache[:, s]
            return
        for cache in kv_caches:
            cache[:, dst] = cache[:, src]
