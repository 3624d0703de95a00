"""The Backend interface: everything hwlm asks of a piece of hardware.

A backend is a class (one instance per device) with a handful of members:

- ``probe()``: is this hardware here? A score for ranking, a reason for humans. Class method,
  side-effect free: it must not initialise a GPU runtime in the calling process.
- ``check(model, engine)``: why this backend cannot serve a configuration (empty list = it can).
- ``memory_budget(utilization)``: bytes it can give the KV cache.
- ``allocate_kv_cache(...)``: one tensor per layer, layout ``[2, num_blocks, block_size,
  num_kv_heads, head_size]`` (see ``hwlm.attention``).
- ``write_kv``, ``attention``, ``copy_blocks``: the paged-attention operations.
- ``kv_cache_dtypes``: the ``kv_cache_dtype`` settings a backend runs; "auto" (the model's dtype)
  everywhere, "fp8" (float8_e4m3fn with per-layer ``k_scale``/``v_scale``, passed to
  ``write_kv`` and ``attention`` only for an fp8 cache) where listed; ``check`` refuses others.
- ``rms_norm``, ``add_rms_norm``, ``silu_and_mul``, ``rotary``, ``greedy_sample`` and
  ``masked_greedy_sample``: optional fused ops; the defaults here are portable torch.
- ``prepare_model(model)``: optional, called once after the weights are loaded; a backend may
  hand the model's dense layers to faster kernels (the CPU backend repacks them for oneDNN).
- ``quantizations`` and ``quantized_linear(weight, bias, method)``: optional, the weight
  quantizations (``int8``, ``int4``) a backend runs and the kernel of one quantized dense layer;
  the default runs none and refuses with a one-line error (docs/quantization.md).
- ``prequantized_linear(weight, bias)``: optional, the kernel of a dense layer whose checkpoint
  stored it quantized (``hwlm.models.quantized_weight``); the default dequantizes it once.
- ``capture_decode(...)``: optional, a ``DecodeRunner`` that replays decode steps faster than
  eager execution (the cuda backend's CUDA graphs), or None.
- Device policy, optional, answered differently by devices that run asynchronously to the host
  (the defaults are the CPU's): ``overlap_steps``, ``profile_memory_with_warm_up``,
  ``default_max_num_batched_tokens(offline)``, ``upload(host)``, ``start_host_copy(tensors)`` and
  ``host_buffer(shape, dtype)``.

A plugin backend sets ``interface_version`` to the ``INTERFACE_VERSION`` it was written for;
hwlm refuses one built for another version.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from hwlm.engine.transfer import CopyAtWait, HostCopy

if TYPE_CHECKING:
    from hwlm.attention import AttentionMetadata
    from hwlm.config import EngineConfig, ModelConfig
    from hwlm.models.quantized_weight import PrequantizedWeight

INTERFACE_VERSION = 1


class QuantizedLinear(Protocol):
    """One dense layer with quantized weights: ``y = x W_q^T + b`` for ``x`` [..., in]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weights the kernel multiplies by (quantized, then
        dequantized): what a reference computes with to check the kernel alone."""
        ...


class DequantizedLinear:
    """The fallback ``QuantizedLinear``: float weights multiplied by ``torch``'s own kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        self.weight = weight
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(torch.float32)


def unsupported_quantization(backend: str, method: str, supported: tuple[str, ...]) -> str:
    """The one-line error for a quantization a backend cannot run."""
    runs = ", ".join(supported) if supported else "none"
    return f"quantization {method!r} is not supported by the {backend} backend (it runs: {runs})"


class DecodeRunner(Protocol):
    """Runs the model's forward for steps of one query token per sequence (decode)."""

    def fits(self, num_seqs: int) -> bool:
        """Whether a decode step of ``num_seqs`` sequences can run here."""
        ...

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The model's hidden states ``[num_seqs, hidden]``, as ``model(...)`` would return."""
        ...


class StepRunner(Protocol):
    """Runs the model's forward for steps of any shape (prefill, mixed) whose token count, as
    the engine pads it (``Backend.eager_token_buckets``), is one the runner prepared."""

    def fits(self, num_tokens: int) -> bool:
        """Whether a step of ``num_tokens`` (padded) tokens can run here."""
        ...

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The model's hidden states ``[num_tokens, hidden]``, as ``model(...)`` would return."""
        ...


@dataclass(frozen=True)
class ProbeResult:
    available: bool
    score: int  # higher wins under --device auto; cpu is 10, GPUs 100
    reason: str  # one line: what was found, or why not


class Backend(ABC):
    name: ClassVar[str]
    interface_version: ClassVar[int] = INTERFACE_VERSION
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    preferred_dtype: ClassVar[torch.dtype] = torch.float32
    # Whether the engine overlaps steps by default (``async_scheduling=None``): schedules and
    # launches step n + 1 while the device runs step n. Worth it only where the forward runs
    # asynchronously to the host; on a CPU the host runs it, so there is nothing to overlap.
    overlap_steps: ClassVar[bool] = False
    # Whether the engine's warm-up step, run before ``memory_budget``, is as large as the
    # scheduler allows, so that the budget can count a step's peak memory. Otherwise the engine
    # warms up with two small steps, which compile what the first requests would wait for.
    profile_memory_with_warm_up: ClassVar[bool] = False
    # The weight quantizations ``quantized_linear`` accepts (names from ``EngineArgs``).
    quantizations: ClassVar[tuple[str, ...]] = ()
    # The torch.distributed library of tensor parallelism's collectives (``hwlm.distributed``).
    distributed_backend: ClassVar[str] = "gloo"
    # The ``kv_cache_dtype`` settings (names from ``EngineArgs``) this backend runs.
    kv_cache_dtypes: ClassVar[tuple[str, ...]] = ("auto",)

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    @classmethod
    @abstractmethod
    def probe(cls) -> ProbeResult:
        """Whether the hardware is present; must not initialise a GPU runtime."""

    def check(self, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> list[str]:
        """Reasons this backend cannot serve this configuration; empty when it can."""
        if dtype not in self.supported_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            return [f"{self.name} backend does not support dtype {dtype}; supported: {names}"]
        if engine.kv_cache_dtype not in self.kv_cache_dtypes:
            runs = ", ".join(self.kv_cache_dtypes)
            return [
                f"kv_cache_dtype {engine.kv_cache_dtype!r} is not supported by the {self.name} "
                f"backend (it runs: {runs})"
            ]
        return []

    @abstractmethod
    def memory_budget(self, memory_utilization: float) -> int:
        """Bytes this backend can give the KV cache, once the model is loaded and warmed up.
        With ``profile_memory_with_warm_up`` the warm-up was a step as large as the scheduler
        allows (with a one-block cache), so a backend can count that step's peak (cuda does)."""

    def allocate_kv_cache(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
    ) -> list[torch.Tensor]:
        shape = (2, num_blocks, block_size, num_kv_heads, head_size)
        return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    @abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # one layer's cache
        slot_mapping: torch.Tensor,  # int64 [num_tokens]; -1 = skip
        k_scale: torch.Tensor | None = None,  # float32 [1], fp8 caches only
        v_scale: torch.Tensor | None = None,
    ) -> None:
        """Store each token's key and value at its slot. An fp8 cache (float8_e4m3fn) stores
        ``clamp(k / k_scale, -448, 448)`` rounded to nearest even, and the same for v
        (``hwlm.kernels.reference.write_kv``); the scales are passed only for fp8 caches."""

    @abstractmethod
    def attention(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        kv_cache: torch.Tensor,  # one layer's cache, already holding this step's keys/values
        metadata: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,  # float32 [1], fp8 caches only
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal paged attention for a mixed batch; returns [num_tokens, num_heads, head_size].
        An fp8 cache's keys and values are read as ``fp8 * k_scale`` and ``fp8 * v_scale``."""

    @abstractmethod
    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        """For each (src, dst) pair copy block src to block dst in every layer (copy-on-write)."""

    # Optional fused ops, overridden where a backend has faster versions.
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(x + residual), x + residual)``: a decoder layer's residual add fused with
        the next norm. The sum is rounded to the input dtype (as torch's add) before the norm.

        ``x`` is left unchanged; an implementation may write the sum over ``residual``, so
        callers must not read ``residual`` afterwards (only the returned sum)."""
        new_residual = x + residual
        return self.rms_norm(new_residual, weight, eps), new_residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding (rotate-half layout) of ``q`` [n, heads, d] and ``k`` [n, kv_heads,
        d], which may be strided views, with ``cos``/``sin`` [n, 1, d // 2]. Returns new
        contiguous tensors, rounded as ``hwlm.models.rotary.apply_rotary`` does; ``q`` and ``k``
        are left unchanged."""
        from hwlm.models.rotary import apply_rotary  # hwlm.models imports this module

        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def greedy_sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's argmax (int64; ties to the lowest id) and its log-probability (float32)
        under the row's softmax, for a batch whose rows all sample greedily and want nothing
        else (``hwlm.sampling.sampler``)."""
        from hwlm.sampling.sampler import greedy_in_torch

        return greedy_in_torch(logits)

    def masked_greedy_sample(
        self, logits: torch.Tensor, words: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``greedy_sample`` over the tokens each row's grammar allows, for a batch whose rows
        all sample greedily and want nothing else: ``words`` int32 [rows, n] on the device, bit
        ``j`` of word ``w`` allowing token ``32 * w + j`` (ids past the words are forbidden).
        The log-probability is under the raw logits' softmax, as for every sampled token."""
        from hwlm.sampling.structured.bitmask import allowed_tokens

        raw = logits.float()
        tokens = torch.where(allowed_tokens(words, raw.shape[1]), raw, float("-inf")).argmax(-1)
        return tokens, raw.gather(1, tokens[:, None])[:, 0] - raw.logsumexp(dim=-1)

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Called once with the loaded model, before the first forward; the default keeps torch's
        own dense layers."""
        return None

    def quantized_linear(
        self, weight: torch.Tensor, bias: torch.Tensor | None, method: str
    ) -> QuantizedLinear:
        """A kernel for the dense layer ``x weight^T + bias`` with ``weight`` [out, in] quantized
        by ``method`` (one of ``quantizations``); called at load time, once per layer and for the
        LM head. The kernel keeps what it needs, so the caller may free ``weight``."""
        raise ValueError(unsupported_quantization(self.name, method, self.quantizations))

    def prequantized_linear(
        self, weight: PrequantizedWeight, bias: torch.Tensor | None
    ) -> QuantizedLinear:
        """A kernel for a dense layer whose weights a checkpoint stored quantized (AWQ, GPTQ,
        GGUF, fp8; ``hwlm.models.quantized_weight``), used as they are where the backend has a
        kernel for the layout. The default dequantizes once into a plain layer of the weights'
        float values, so every backend can run every checkpoint."""
        bias = None if bias is None else bias.to(self.device)
        return DequantizedLinear(weight.dequantize().to(self.device), bias)

    def capture_decode(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
    ) -> DecodeRunner | None:
        """A faster path for decode steps of up to ``max_num_seqs`` sequences, or None (the
        default: every step runs the model eagerly)."""
        return None

    def capture_steps(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        token_sizes: tuple[int, ...],
    ) -> StepRunner | None:
        """A faster path for the steps ``capture_decode`` does not take (prefills, decodes
        beside a prefill), for some of ``token_sizes`` (the padded token counts the engine
        sends), or None (the default: those steps run the model eagerly)."""
        return None

    def bind_rank(self, local_rank: int, local_world_size: int) -> None:
        """Take this tensor-parallel rank's share of the host (its device, its cores), before
        anything is allocated; ``local_world_size`` ranks share this host. ValueError (one
        line) when the host has too few devices. The default does nothing."""
        return None

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on synchronous devices."""
        return None

    # Device policy ------------------------------------------------------------------------------

    def default_max_num_batched_tokens(self, offline: bool) -> int:
        """The most tokens one step computes when the user does not say (``offline``: for
        ``LLM`` batches rather than a server, where latency matters). The default is 8192."""
        return 8192

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` (a CPU tensor the engine built) on ``self.device``. With overlapped steps this
        must not wait for queued device work (GPUs copy from pinned memory, see
        ``hwlm.engine.transfer.pinned_upload``); the caller does not modify ``host`` afterwards.
        The default is a plain ``to``, which returns ``host`` itself on the CPU."""
        return host.to(self.device)

    def start_host_copy(self, tensors: list[torch.Tensor]) -> HostCopy:
        """Start copying a step's sampled tensors to the host; the engine calls ``wait()`` on the
        result when it needs them, after launching the next step. The default copies only then
        (``hwlm.engine.transfer.CopyAtWait``; CPU tensors need no copy); GPUs start the copy at
        once into pinned buffers and record an event (``PinnedHostCopy``)."""
        return CopyAtWait(tensors)

    def eager_token_buckets(self, max_num_tokens: int) -> tuple[int, ...]:
        """The row counts an eager step (one not replayed from a captured graph) is padded up
        to, ascending and ending with ``max_num_tokens``; empty: no padding. GPUs pad: their
        GEMM libraries pick, and may load, a kernel for every new row count (0.15 to 3 ms per
        new count and weight shape on an H200), which a server whose step sizes never repeat
        would pay every step; the engine warms every bucket at start-up instead."""
        return ()

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor for values the host builds and then ``upload``s (the
        grammars' masks): GPUs give pinned memory, which ``upload`` sends without a copy."""
        return torch.empty(shape, dtype=dtype)
