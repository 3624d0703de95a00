"""Llama 2/3, Mistral, Qwen2/2.5 and Qwen3: one pre-norm decoder with per-family switches.

- Llama: ``attention_bias`` (q, k, v, o) and ``mlp_bias`` flags.
- Mistral: no biases.
- Qwen2: bias on q, k, v only.
- Qwen3: ``attention_bias`` flag, and per-head RMSNorm of q and k before rotary.

As in vLLM, each decoder layer takes and returns ``(hidden, residual)``: the residual add that
ends one layer's attention or MLP block is fused with the RMSNorm that follows it (the next
block's input norm, or the final norm) through ``Backend.add_rms_norm``. The first layer has no
residual yet. The sums are the same as ``h = h + block(norm(h))``, bit for bit.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hwlm.attention import ForwardContext
from hwlm.config import ModelConfig
from hwlm.distributed.parallel_state import ParallelGroup
from hwlm.distributed.sharding import even_shard, head_shard, vocab_shard
from hwlm.models import CausalLM
from hwlm.models.layers import (
    Attention,
    Embedding,
    Linear,
    RMSNorm,
    column_linear,
    row_linear,
    vocab_embedding,
)
from hwlm.models.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        tp: ParallelGroup | None = None,
    ) -> None:
        super().__init__()
        d = config.head_size
        rank, size = (0, 1) if tp is None else (tp.rank, tp.size)
        q = head_shard(config.num_heads, d, rank, size)  # this rank's heads (all of them: 1 rank)
        kv = head_shard(config.num_kv_heads, d, rank, size)
        self.num_heads, self.num_kv_heads, self.head_size = q.size // d, kv.size // d, d
        self.sizes = [q.size, kv.size, kv.size]
        self.qkv_proj = column_linear(config.hidden_size, [q, kv, kv], qkv_bias, dtype, tp)
        self.o_proj = row_linear(q, config.hidden_size, o_bias, dtype, tp)
        self.q_norm = RMSNorm(d, config.norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(d, config.norm_eps, dtype) if qk_norm else None
        self.attn = Attention(layer_idx, d**-0.5)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        n, d = x.shape[0], self.head_size
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(-1, d), ctx.backend)
            k = self.k_norm(k.reshape(-1, d), ctx.backend)
        q, k = ctx.backend.rotary(
            q.view(n, self.num_heads, d), k.view(n, self.num_kv_heads, d), cos, sin
        )
        v = v.reshape(n, self.num_kv_heads, d).contiguous()
        out: torch.Tensor = self.o_proj(self.attn(q, k, v, ctx))
        return out


class LlamaMLP(nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, bias: bool, tp: ParallelGroup | None = None
    ) -> None:
        super().__init__()
        rank, size = (0, 1) if tp is None else (tp.rank, tp.size)
        inter = even_shard(config.intermediate_size, rank, size)
        self.gate_up_proj = column_linear(config.hidden_size, [inter, inter], bias, dtype, tp)
        self.down_proj = row_linear(inter, config.hidden_size, bias, dtype, tp)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(ctx.backend.silu_and_mul(self.gate_up_proj(x)))
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        tp: ParallelGroup | None = None,
    ) -> None:
        super().__init__()
        hf, family = config.hf, config.family
        attention_bias = bool(hf.get("attention_bias", False))
        if config.architecture == "MistralForCausalLM":
            qkv_bias = o_bias = mlp_bias = False
        elif family == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif family == "qwen3":
            qkv_bias = o_bias = attention_bias
            mlp_bias = False
        else:
            qkv_bias = o_bias = attention_bias
            mlp_bias = bool(hf.get("mlp_bias", False))
        self.self_attn = LlamaAttention(
            config, layer_idx, dtype, qkv_bias, o_bias, qk_norm=family == "qwen3", tp=tp
        )
        self.mlp = LlamaMLP(config, dtype, mlp_bias, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, dtype)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` is the previous block's output and ``residual`` the stream it is added to (None
        for the first layer, whose ``h`` is the embeddings). Returns this layer's MLP output and
        the residual stream before it is added: the caller fuses that add with its next norm."""
        if residual is None:
            residual, h = h, self.input_layernorm(h, ctx.backend)
        else:
            h, residual = self.input_layernorm.add_and_norm(h, residual, ctx.backend)
        h = self.self_attn(h, cos, sin, ctx)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual, ctx.backend)
        return self.mlp(h, ctx), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, tp: ParallelGroup | None = None
    ) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, tp) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, ctx)
        if residual is None:  # no layers
            normed: torch.Tensor = self.norm(h, ctx.backend)
            return normed
        return self.norm.add_and_norm(h, residual, ctx.backend)[0]


class LlamaForCausalLM(CausalLM):
    packed_modules = {
        ".q_proj.": (".qkv_proj.", 0),
        ".k_proj.": (".qkv_proj.", 1),
        ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, parallel: ParallelGroup | None = None
    ) -> None:
        """With ``parallel``: this rank's shard (``hwlm.distributed.sharding``)."""
        super().__init__()
        act = config.hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{config.architecture} with hidden_act {act!r} is not supported")
        _warn_sliding_window(config)
        self.config = config
        self.parallel = parallel
        self.model = LlamaModel(config, dtype, parallel)
        if config.tie_word_embeddings:
            self.lm_head: Linear | Embedding = self.model.embed_tokens
        elif parallel is None:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        else:
            vocab = vocab_shard(config.vocab_size, parallel.rank, parallel.size)
            self.lm_head = column_linear(config.hidden_size, [vocab], False, dtype, parallel)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        hidden: torch.Tensor = self.model(input_ids, positions, ctx)
        return hidden


def _warn_sliding_window(config: ModelConfig) -> None:
    hf = config.hf
    window = hf.get("sliding_window")
    if config.family == "llama":
        used = window is not None  # Mistral applies it whenever set
    else:
        used = bool(hf.get("use_sliding_window", False))
    if used and window and window < config.max_position_embeddings:
        logger.warning(
            "%s declares sliding-window attention (window %d), which hwlm does not implement: "
            "outputs differ from the reference for contexts longer than %d tokens",
            config.architecture,
            window,
            window,
        )
