"""NVIDIA GPUs through PyTorch's CUDA runtime and the Triton kernels in ``hwlm.kernels.triton``.

``probe()`` never initialises CUDA in the calling process: it reads the driver's
``/proc/driver/nvidia/gpus`` entries, or asks NVML (``pynvml``, which opens no CUDA context).
The Triton kernels are imported when a backend is constructed, so probing works without triton.
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING, ClassVar

import torch

from hwlm.attention import AttentionMetadata
from hwlm.backend import Backend, DecodeRunner, ProbeResult, QuantizedLinear, StepRunner
from hwlm.engine.transfer import HostCopy, PinnedHostCopy, pinned_buffer, pinned_upload

if TYPE_CHECKING:
    from hwlm.config import EngineConfig, ModelConfig
    from hwlm.models.quantized_weight import PrequantizedWeight

MAX_HEAD_SIZE = 256
# The largest (padded) step recorded as piecewise CUDA graphs (``capture_steps``); 0 records
# none (every prefill and mixed step eager). Unset: every step size up to the token budget.
PIECEWISE_MAX_TOKENS_ENV = "HWLM_PIECEWISE_MAX_TOKENS"


def piecewise_max_tokens() -> int | None:
    """``HWLM_PIECEWISE_MAX_TOKENS`` (0: no piecewise graphs), or None (unset: no cap)."""
    text = os.environ.get(PIECEWISE_MAX_TOKENS_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text)
        if value < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{PIECEWISE_MAX_TOKENS_ENV} must be a token count (0 for none), got {text!r}"
        ) from None
    return value


def _nvidia_gpus(proc_dir: str = "/proc/driver/nvidia/gpus") -> list[str]:
    """Model names of the NVIDIA GPUs the driver reports, without touching the CUDA runtime."""
    names = []
    for info in sorted(glob.glob(os.path.join(proc_dir, "*", "information"))):
        name = "NVIDIA GPU"
        try:
            with open(info) as f:
                for line in f:
                    if line.startswith("Model:"):
                        name = line.partition(":")[2].strip()
                        break
        except OSError:
            pass
        names.append(name)
    if names:
        return names
    try:
        import pynvml  # nvidia-ml-py: talks to the driver, creates no CUDA context
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            for i in range(count):
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names.append(name.decode() if isinstance(name, bytes) else str(name))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, or NVML unusable: treat as no GPU
        return []
    return names


def _describe(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{c} x {n}" for n, c in counts.items())


def _hidden_by_env() -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing (or -1) hides every GPU from this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible is not None and visible.strip() in ("", "-1")


class CUDABackend(Backend):
    name = "cuda"
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    preferred_dtype = torch.bfloat16
    # fp8: float8_e4m3fn (Hopper/Ada hardware converts it; older GPUs emulate the casts).
    kv_cache_dtypes: ClassVar[tuple[str, ...]] = ("auto", "fp8", "fp8_e4m3")
    warp_size: ClassVar[int] = 32  # threads per warp: Triton's num_warps counts these
    # The GPU runs a step's kernels while the host prepares the next one: overlap them, and
    # size the KV cache after a step as large as the scheduler allows.
    overlap_steps = True
    profile_memory_with_warm_up = True
    distributed_backend = "nccl"
    quantizations: ClassVar[tuple[str, ...]] = ("int8", "int4", "fp8")  # backends/cuda_quant.py

    def __init__(self) -> None:
        super().__init__()
        from hwlm.kernels import triton as kernels  # imports triton: only once we are chosen

        self._kernels = kernels
        self.device = torch.device("cuda", 0)
        self._num_sms: int | None = None

    @classmethod
    def probe(cls) -> ProbeResult:
        if torch.version.hip is not None:
            return ProbeResult(False, 0, "this PyTorch build is for ROCm; use the rocm backend")
        if torch.version.cuda is None:
            return ProbeResult(False, 0, "this PyTorch build has no CUDA support")
        if _hidden_by_env():
            return ProbeResult(False, 0, "CUDA_VISIBLE_DEVICES hides every GPU")
        names = _nvidia_gpus()
        if not names:
            return ProbeResult(False, 0, "no NVIDIA GPU found (no driver entries, no NVML)")
        return ProbeResult(True, 100, f"{_describe(names)} (CUDA {torch.version.cuda})")

    def check(self, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> list[str]:
        reasons = super().check(model, engine, dtype)
        if not 16 <= model.head_size <= MAX_HEAD_SIZE or model.head_size % 8:
            reasons.append(
                f"{self.name} attention supports head sizes 16..{MAX_HEAD_SIZE} in multiples of "
                f"8, got {model.head_size}"
            )
        if model.num_heads % model.num_kv_heads:
            reasons.append(
                f"num_heads ({model.num_heads}) must be a multiple of num_kv_heads "
                f"({model.num_kv_heads})"
            )
        return reasons

    def bind_rank(self, local_rank: int, local_world_size: int) -> None:
        """Rank ``local_rank`` runs on GPU ``local_rank`` of those visible."""
        count = torch.cuda.device_count()
        if count < local_world_size:
            raise ValueError(
                f"tensor_parallel_size {local_world_size} needs {local_world_size} GPUs on this "
                f"host; {count} visible"
            )
        self.device = torch.device("cuda", local_rank)
        torch.cuda.set_device(self.device)

    def memory_budget(self, memory_utilization: float) -> int:
        """``memory_utilization`` of the whole device, less what is used outside torch's
        allocator (the CUDA context, libraries, other processes) and less the peak torch has
        allocated since ``prepare_model``: the weights plus the engine's warm-up step, the
        largest step the scheduler allows, run before the KV cache exists. Blocks the
        allocator keeps cached are released first, so the cache's large tensors can use them."""
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return max(0, int(memory_utilization * total - outside_torch - peak))

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Start the peak-memory measurement that ``memory_budget`` reads: loading's transient
        buffers are gone; what counts from here is the weights and the warm-up step."""
        if self.device.type == "cuda":  # not under the interpreter's CPU tensors
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def num_sms(self) -> int:
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return self._num_sms

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        self._kernels.write_kv(
            key, value, kv_cache, slot_mapping, k_scale, v_scale, warp_size=self.warp_size
        )

    def attention(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out: torch.Tensor = self._kernels.paged_attention(
            query,
            kv_cache,
            metadata,
            scale,
            k_scale,
            v_scale,
            warp_size=self.warp_size,
            num_sms=self.num_sms,
        )
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out: torch.Tensor = self._kernels.rms_norm(x, weight, eps, warp_size=self.warp_size)
        return out

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Writes the sum over ``residual`` (the Backend contract allows it): no extra buffer.
        normed, total = self._kernels.add_rms_norm(
            x, residual, weight, eps, warp_size=self.warp_size
        )
        return normed, total

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._kernels.silu_and_mul(x, warp_size=self.warp_size)
        return out

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_out, k_out = self._kernels.rotary(q, k, cos, sin, warp_size=self.warp_size)
        return q_out, k_out

    def greedy_sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logprobs = self._kernels.greedy_sample(logits, warp_size=self.warp_size)
        return tokens, logprobs

    def masked_greedy_sample(
        self, logits: torch.Tensor, words: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logprobs = self._kernels.masked_greedy_sample(
            logits, words, warp_size=self.warp_size
        )
        return tokens, logprobs

    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        self._kernels.copy_blocks(kv_caches, pairs)

    def quantized_linear(
        self, weight: torch.Tensor, bias: torch.Tensor | None, method: str
    ) -> QuantizedLinear:
        from .cuda_quant import quantized_linear

        return quantized_linear(weight, bias, method, self.num_sms)

    def prequantized_linear(
        self, weight: PrequantizedWeight, bias: torch.Tensor | None
    ) -> QuantizedLinear:
        from .cuda_quant import prequantized_linear

        return prequantized_linear(weight, bias, self.device, self.num_sms)

    def capture_decode(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
    ) -> DecodeRunner | None:
        from .cuda_graphs import DecodeGraphs

        return DecodeGraphs(model, self, kv_caches, max_num_seqs, max_model_len).capture()

    def capture_steps(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        token_sizes: tuple[int, ...],
    ) -> StepRunner | None:
        """Piecewise CUDA graphs (attention left eager) for every step size, or those of up to
        ``HWLM_PIECEWISE_MAX_TOKENS`` tokens. Every size, because an eager step is bound by its
        ~1,000 launches even at thousands of tokens on a small model: a 3,584-token mixed step of
        the Qwen2.5-0.5B shape took ~23 ms eager on the H200 and ~7 ms as graphs (S1's burst,
        docs/benchmarks.md); recording the 12 sizes above 2,048 of an 8,192-token budget added
        ~1 s at start-up."""
        from .cuda_piecewise import PiecewiseGraphs

        cap = piecewise_max_tokens()
        sizes = tuple(n for n in token_sizes if cap is None or n <= cap)
        return PiecewiseGraphs(model, self, kv_caches, sizes).capture() if sizes else None

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def default_max_num_batched_tokens(self, offline: bool) -> int:
        """vLLM's defaults on large GPUs: offline batches take fewer, larger prefill steps
        (16384 tokens); a server keeps 8192 for latency."""
        return 16384 if offline else 8192

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return pinned_upload(host, self.device)

    def start_host_copy(self, tensors: list[torch.Tensor]) -> HostCopy:
        return PinnedHostCopy(tensors, self.device)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return pinned_buffer(shape, dtype)

    def eager_token_buckets(self, max_num_tokens: int) -> tuple[int, ...]:
        return token_buckets(max_num_tokens)


def token_buckets(max_num_tokens: int) -> tuple[int, ...]:
    """Multiples of 16 up to 256, of 64 up to 1024, of 256 up to 4096, then of 1024: a padded
    step computes at most 15 rows or 1/16 more than it needs, over about 50 sizes in all up to
    16,384 tokens."""
    sizes: list[int] = []
    for step, limit in ((16, 256), (64, 1024), (256, 4096), (1024, max_num_tokens)):
        start = sizes[-1] + step if sizes else step
        sizes.extend(range(start, min(limit, max_num_tokens - 1) + 1, step))
    return (*[n for n in sizes if n < max_num_tokens], max_num_tokens)
