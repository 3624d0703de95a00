"""Building blocks shared by the model families.

Parameters are allocated with ``torch.empty`` (no initialisation: the loader fills them) in the
target dtype, on whatever device is current (``build_model`` sets the backend's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hwlm.attention import ForwardContext
from hwlm.backend import Backend


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


LinearKernel = Callable[[torch.Tensor], torch.Tensor]


class Linear(nn.Module):
    """``y = x W^T + b``. With several ``output_sizes`` it is a fusion of that many checkpoint
    projections stacked along the output dimension (qkv, gate/up): the loader fills each shard.

    A backend's ``prepare_model`` may set ``kernel``: a callable computing the same product from
    weights it has repacked (the CPU backend's oneDNN layout), used instead of ``F.linear``.
    ``quantize`` sets it to the backend's quantized kernel instead (``quantization`` names the
    method); a backend leaves layers that already have a kernel as they are."""

    def __init__(
        self, in_features: int, output_sizes: int | list[int], bias: bool, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        out_features = sum(self.output_sizes)
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None
        self.kernel: LinearKernel | None = None
        self.quantization: str | None = None

    def quantize(self, backend: Backend, method: str) -> None:
        """Run through ``backend``'s kernel for weights quantized by ``method``; the float weights
        (and bias, which the kernel adds) are freed."""
        bias = None if self.bias is None else self.bias.detach()
        self.kernel = backend.quantized_linear(self.weight.detach(), bias, method)
        self.quantization = method
        release(self.weight)
        if self.bias is not None:
            release(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return F.linear(x, self.weight, self.bias)


def release(param: torch.Tensor) -> None:
    """Free a parameter whose values now live only in a kernel's own copy."""
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param(num_embeddings, dim, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)

    def forward(self, x: torch.Tensor, backend: Backend) -> torch.Tensor:
        return backend.rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor, backend: Backend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)`` in one fused op; ``residual`` is consumed (the
        backend may overwrite it)."""
        return backend.add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype) if affine else None
        self.bias = _param(dim, dtype=dtype) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Stores this step's keys/values in the layer's paged cache, then attends over the cache."""

    def __init__(self, layer_idx: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.scale = scale

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """q [n, heads, d], k/v [n, kv_heads, d] (contiguous) -> [n, heads * d]."""
        cache = ctx.kv_caches[self.layer_idx]
        ctx.backend.write_kv(k, v, cache, ctx.metadata.slot_mapping)
        out = ctx.backend.attention(q, cache, ctx.metadata, self.scale)
        return out.reshape(q.shape[0], -1)
