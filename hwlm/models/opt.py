"""OPT: learned positions (offset 2), LayerNorm, ReLU, biases, pre- or post-norm
(``do_layer_norm_before``), and project_in/project_out when ``word_embed_proj_dim`` differs from
``hidden_size`` (opt-350m)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hwlm.attention import ForwardContext
from hwlm.config import ModelConfig
from hwlm.distributed.parallel_state import ParallelGroup
from hwlm.distributed.sharding import even_shard, head_shard, vocab_shard
from hwlm.models import CausalLM
from hwlm.models.layers import (
    Attention,
    Embedding,
    LayerNorm,
    Linear,
    column_linear,
    row_linear,
    vocab_embedding,
)

_POSITION_OFFSET = 2  # OPT's position table has two extra leading rows
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class OPTAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        bias: bool,
        tp: ParallelGroup | None = None,
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        rank, size = (0, 1) if tp is None else (tp.rank, tp.size)
        heads = head_shard(config.num_heads, config.head_size, rank, size)
        self.num_heads, self.head_size = heads.size // config.head_size, config.head_size
        self.qkv_proj = column_linear(hidden, [heads, heads, heads], bias, dtype, tp)
        self.out_proj = row_linear(heads, hidden, bias, dtype, tp)
        self.attn = Attention(layer_idx, config.head_size**-0.5)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(x.shape[0], 3, self.num_heads, self.head_size)
        q, k, v = (t.contiguous() for t in qkv.unbind(1))
        out: torch.Tensor = self.out_proj(self.attn(q, k, v, ctx))
        return out


class OPTDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        tp: ParallelGroup | None = None,
    ) -> None:
        super().__init__()
        hf, hidden, eps = config.hf, config.hidden_size, config.norm_eps
        bias = bool(hf.get("enable_bias", True))
        affine = bool(hf.get("layer_norm_elementwise_affine", True))
        act = hf.get("activation_function", "relu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"OPT with activation_function {act!r} is not supported")
        self.act = _ACTIVATIONS[act]
        self.pre_norm = bool(hf.get("do_layer_norm_before", True))
        self.self_attn = OPTAttention(config, layer_idx, dtype, bias, tp)
        self.self_attn_layer_norm = LayerNorm(hidden, eps, affine, dtype)
        rank, size = (0, 1) if tp is None else (tp.rank, tp.size)
        ffn = even_shard(config.intermediate_size, rank, size)
        self.fc1 = column_linear(hidden, [ffn], bias, dtype, tp)
        self.fc2 = row_linear(ffn, hidden, bias, dtype, tp)
        self.final_layer_norm = LayerNorm(hidden, eps, affine, dtype)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.pre_norm:
            h = h + self.self_attn(self.self_attn_layer_norm(h), ctx)
            mlp: torch.Tensor = self.fc2(self.act(self.fc1(self.final_layer_norm(h))))
            return h + mlp
        h = self.self_attn_layer_norm(h + self.self_attn(h, ctx))
        out: torch.Tensor = self.final_layer_norm(h + self.fc2(self.act(self.fc1(h))))
        return out


class OPTDecoder(nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, tp: ParallelGroup | None = None
    ) -> None:
        super().__init__()
        hf, hidden = config.hf, config.hidden_size
        embed_dim = int(hf.get("word_embed_proj_dim") or hidden)
        self.embed_tokens = vocab_embedding(config.vocab_size, embed_dim, dtype, tp)
        self.embed_positions = Embedding(
            config.max_position_embeddings + _POSITION_OFFSET, hidden, dtype
        )
        projected = embed_dim != hidden
        self.project_in = Linear(embed_dim, hidden, False, dtype) if projected else None
        self.project_out = Linear(hidden, embed_dim, False, dtype) if projected else None
        final_norm = hf.get("do_layer_norm_before", True) and not hf.get(
            "_remove_final_layer_norm", False
        )
        affine = bool(hf.get("layer_norm_elementwise_affine", True))
        self.final_layer_norm = (
            LayerNorm(hidden, config.norm_eps, affine, dtype) if final_norm else None
        )
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, i, dtype, tp) for i in range(config.num_layers)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        h: torch.Tensor = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + _POSITION_OFFSET)
        for layer in self.layers:
            h = layer(h, ctx)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        return h


class OPTModel(nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, tp: ParallelGroup | None = None
    ) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config, dtype, tp)


class OPTForCausalLM(CausalLM):
    packed_modules = {
        ".q_proj.": (".qkv_proj.", 0),
        ".k_proj.": (".qkv_proj.", 1),
        ".v_proj.": (".qkv_proj.", 2),
    }

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, parallel: ParallelGroup | None = None
    ) -> None:
        """With ``parallel``: this rank's shard (``hwlm.distributed.sharding``); the position
        table and project_in/out are replicated."""
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.model = OPTModel(config, dtype, parallel)
        decoder = self.model.decoder
        embed_dim = decoder.embed_tokens.weight.shape[1]
        if config.tie_word_embeddings:
            self.lm_head: Linear | Embedding = decoder.embed_tokens
        elif parallel is None:
            self.lm_head = Linear(embed_dim, config.vocab_size, False, dtype)
        else:
            vocab = vocab_shard(config.vocab_size, parallel.rank, parallel.size)
            self.lm_head = column_linear(embed_dim, [vocab], False, dtype, parallel)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        hidden: torch.Tensor = self.model.decoder(input_ids, positions, ctx)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # project_out runs here rather than in forward: only on the rows that are sampled.
        project_out = self.model.decoder.project_out
        if project_out is not None:
            hidden = project_out(hidden)
        return super().compute_logits(hidden)
