"""GGUF tensors as Hugging Face names and hwlm layouts.

Dense-layer weights of type Q8_0 and Q4_0 become ``GroupQuantizedWeight`` exactly:
- Q8_0: blocks of 32 inputs, a float16 scale ``d`` and 32 int8 ``q``; ``w = d * q``, which is
  8-bit code ``q + 128`` with the symmetric zero point 128.
- Q4_0: blocks of 32, a float16 ``d`` and 16 bytes whose low nibbles are elements 0-15 and high
  nibbles elements 16-31; ``w = d * (nibble - 8)``: 4-bit codes with the symmetric zero point 8.
Every other type (F32, F16, BF16, and K-quants such as Q4_K and Q6_K, whose per-32 minimum
``d * sc * q - dmin * m`` is not an integer zero point) is dequantized once, to float, with
``gguf``'s own dequantization.

llama.cpp's converter reorders the rows of q and k in each head for its rotary layout (pairs
interleaved) in ``llama`` files; ``unpermute_rows`` puts them back.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from hwlm.models.quantized_weight import GroupQuantizedWeight

_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
QK8_0 = QK4_0 = 32


def hf_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor ``name``; None for one hwlm does not use."""
    match = _BLOCK.match(name)
    if match:
        layer, part, kind = match.groups()
        mapped = _LAYER.get(part)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"
    base, _, kind = name.rpartition(".")
    mapped = _GLOBAL.get(base)
    return None if mapped is None else f"{mapped}.{kind}"


def rows_and_cols(tensor: Any) -> tuple[int, ...]:
    """The tensor's shape in torch's order (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def group_quantized(tensor: Any) -> GroupQuantizedWeight | None:
    """The exact ``GroupQuantizedWeight`` of a 2-D Q8_0 or Q4_0 tensor, None for other types."""
    import gguf

    kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    shape = rows_and_cols(tensor)
    if len(shape) != 2 or kind not in (
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.Q4_0,
    ):
        return None
    rows, cols = shape
    raw = np.ascontiguousarray(tensor.data).reshape(rows, -1)
    if kind == gguf.GGMLQuantizationType.Q8_0:
        blocks = raw.reshape(rows, cols // QK8_0, 2 + QK8_0)
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bits = 8
    else:
        blocks = raw.reshape(rows, cols // QK4_0, 2 + QK4_0 // 2)
        packed = blocks[..., 2:]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
        bits = 4
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    return GroupQuantizedWeight(
        bits, 32, torch.from_numpy(codes.reshape(rows, cols)), torch.from_numpy(scales), None
    )


def dequantized(tensor: Any) -> torch.Tensor:
    """The float32 values of any GGUF tensor, in torch's dimension order."""
    import gguf

    kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    data = np.asarray(tensor.data)
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        values = data.astype(np.float32)
    else:
        values = gguf.quants.dequantize(data, kind).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(values.reshape(rows_and_cols(tensor))))


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary reordering of the rows (dim 0) of a q or k projection: within
    each head, GGUF row ``2i + j`` is original row ``i + j * head_size / 2``."""
    n = rows.shape[0]
    half = n // heads // 2
    grouped = rows.reshape(heads, half, 2, *rows.shape[1:])
    return grouped.transpose(1, 2).reshape(rows.shape).contiguous()


def unpermute_group_quantized(weight: GroupQuantizedWeight, heads: int) -> GroupQuantizedWeight:
    """``unpermute_rows`` of a quantized weight (its codes, scales and zero points by row)."""
    zeros = None if weight.zeros is None else unpermute_rows(weight.zeros, heads)
    return GroupQuantizedWeight(
        weight.bits,
        weight.group_size,
        unpermute_rows(weight.codes, heads),
        unpermute_rows(weight.scales, heads),
        zeros,
    )
