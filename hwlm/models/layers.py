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
from hwlm.distributed.parallel_state import ParallelGroup
from hwlm.distributed.sharding import Shard, vocab_shard
from hwlm.models.quantized_weight import PrequantizedWeight


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
        # The shape stays known once ``quantize`` frees the float weight.
        self.in_features, self.out_features = in_features, out_features
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

    def load_prequantized(
        self, backend: Backend, weight: PrequantizedWeight, bias: torch.Tensor | None, method: str
    ) -> None:
        """Run through ``backend``'s kernel for weights a checkpoint stored quantized (all shards
        already stacked); the float parameters are freed and the loader no longer expects them."""
        self.kernel = backend.prequantized_linear(weight, bias)
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
    """Stores this step's keys/values in the layer's paged cache, then attends over the cache.

    ``k_scale`` and ``v_scale`` (float32, one element, 1.0 by default as in vLLM) are the
    per-tensor scales of an fp8 KV cache: it stores ``k / k_scale``. They are buffers of this
    layer, so a checkpoint's calibrated scales can be copied into them, in place (captured CUDA
    graphs read them at replay). Other caches ignore them."""

    def __init__(self, layer_idx: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.scale = scale
        self.k_scale: torch.Tensor
        self.v_scale: torch.Tensor
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """q [n, heads, d], k/v [n, kv_heads, d] (contiguous) -> [n, heads * d]."""
        if ctx.pieces is not None:  # recorded in pieces: attention runs between them
            return ctx.pieces.split(self, q, k, v)
        return self.attend(q, k, v, ctx)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        cache = ctx.kv_caches[self.layer_idx]
        md = ctx.metadata
        if cache.dtype == torch.float8_e4m3fn:  # only backends that run fp8 see the scales
            ctx.backend.write_kv(k, v, cache, md.slot_mapping, self.k_scale, self.v_scale)
            out = ctx.backend.attention(q, cache, md, self.scale, self.k_scale, self.v_scale)
        else:
            ctx.backend.write_kv(k, v, cache, md.slot_mapping)
            out = ctx.backend.attention(q, cache, md, self.scale)
        return out.reshape(q.shape[0], -1)


# Tensor parallelism (hwlm.distributed): each rank holds a slice of a layer's weights. With no
# group (tensor_parallel_size 1) the helpers below build the plain layers above, unchanged.


class ColumnParallelLinear(Linear):
    """A ``Linear`` whose outputs are split over the ranks: each keeps its ``Shard`` of every
    fused checkpoint projection (its heads of q, k and v; its slice of gate and up). The output
    stays split: the row-parallel layer that follows takes it as its input slice."""

    def __init__(
        self,
        in_features: int,
        shards: list[Shard],
        bias: bool,
        dtype: torch.dtype,
        group: ParallelGroup,
    ) -> None:
        super().__init__(in_features, [s.size for s in shards], bias, dtype)
        self.shards = shards
        self.group = group

    def checkpoint_slice(self, attr: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        """This rank's part of checkpoint projection ``shard`` (weight or bias)."""
        return _rows(tensor, self.shards[shard or 0])


class RowParallelLinear(Linear):
    """A ``Linear`` whose inputs are split over the ranks (o_proj, down_proj): each multiplies its
    input slice by its columns of the weight, and one all-reduce sums the partial products. The
    bias is added once: rank 0 keeps it, the others hold zeros."""

    def __init__(
        self,
        in_shard: Shard,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        group: ParallelGroup,
    ) -> None:
        super().__init__(in_shard.size, out_features, bias, dtype)
        self.in_shard = in_shard
        self.group = group

    def checkpoint_slice(self, attr: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        if attr == "bias":
            return tensor if self.group.rank == 0 else torch.zeros_like(tensor)
        s = self.in_shard
        return tensor.narrow(1, s.start, s.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(x))


class VocabParallelEmbedding(Embedding):
    """Each rank holds ``vocab_shard``'s rows of the table (padding rows are zero); a token
    outside a rank's rows looks up zeros there, and one all-reduce sums the ranks' rows. As a
    tied LM head its weight gives this rank's logits (``CausalLM.compute_logits`` gathers)."""

    def __init__(
        self, num_embeddings: int, dim: int, dtype: torch.dtype, group: ParallelGroup
    ) -> None:
        self.shard = vocab_shard(num_embeddings, group.rank, group.size)
        super().__init__(self.shard.size, dim, dtype)
        self.group = group

    def checkpoint_slice(self, attr: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        return _rows(tensor, self.shard)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.group.all_reduce(out.masked_fill_(outside[:, None], 0.0))


ParallelLayer = ColumnParallelLinear | RowParallelLinear | VocabParallelEmbedding


def _rows(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Rows ``shard.start ..`` of ``tensor``, zero-padded to ``shard.size`` past ``shard.full``."""
    end = min(shard.start + shard.size, shard.full)
    rows = tensor.narrow(0, shard.start, max(0, end - shard.start))
    if rows.shape[0] == shard.size:
        return rows
    pad = tensor.new_zeros((shard.size - rows.shape[0], *tensor.shape[1:]))
    return torch.cat([rows, pad])


def column_linear(
    in_features: int,
    shards: list[Shard],
    bias: bool,
    dtype: torch.dtype,
    group: ParallelGroup | None,
) -> Linear:
    """A column-parallel layer, or with no group the plain ``Linear`` of the full sizes."""
    if group is None:
        return Linear(in_features, [s.full for s in shards], bias, dtype)
    return ColumnParallelLinear(in_features, shards, bias, dtype, group)


def row_linear(
    in_shard: Shard,
    out_features: int,
    bias: bool,
    dtype: torch.dtype,
    group: ParallelGroup | None,
) -> Linear:
    """A row-parallel layer, or with no group the plain ``Linear`` of the full input size."""
    if group is None:
        return Linear(in_shard.full, out_features, bias, dtype)
    return RowParallelLinear(in_shard, out_features, bias, dtype, group)


def vocab_embedding(
    num_embeddings: int, dim: int, dtype: torch.dtype, group: ParallelGroup | None
) -> Embedding:
    if group is None:
        return Embedding(num_embeddings, dim, dtype)
    return VocabParallelEmbedding(num_embeddings, dim, dtype, group)
