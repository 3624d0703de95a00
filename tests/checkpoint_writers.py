"""Tiny pre-quantized checkpoints written from known codes, for the checkpoint-reader tests.

Each writer takes a tiny float HF model, replaces the weights of its dense layers (not the
embeddings or the LM head) by values that known codes stand for, and saves two folders: the
quantized checkpoint in the format, packed here from the format's public description (not with
hwlm's unpacking code), and a float "twin" with exactly the values the codes mean.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tests.tiny_models import TOKENIZER_DIR, build_tiny_model

DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def known_codes(
    out: int, inp: int, bits: int, group: int, gen: torch.Generator, symmetric: bool = False
) -> dict[str, torch.Tensor]:
    """Random codes [out, in], float16 scales and zero points [out, groups]."""
    top = 1 << bits
    codes = torch.randint(0, top, (out, inp), generator=gen)
    # The same weight magnitudes for any bits: codes span 2**bits steps.
    scales = ((torch.rand(out, inp // group, generator=gen) * 0.04 + 0.01) * 16 / top).half()
    if symmetric:
        zeros = torch.full((out, inp // group), top // 2)
    else:
        zeros = torch.randint(1, top - 1, (out, inp // group), generator=gen)
    return {"codes": codes, "scales": scales, "zeros": zeros}


def dequantize(q: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    codes = q["codes"].float()
    zeros = q["zeros"].float().repeat_interleave(group, dim=1)
    return (codes - zeros) * q["scales"].float().repeat_interleave(group, dim=1)


def _words(values: np.ndarray, bits: int, order: list[int]) -> np.ndarray:
    """Pack int ``values`` [..., m] along the last dim: word nibble/byte ``i`` holds element
    ``order[i]`` of its group of ``32 // bits``."""
    per = 32 // bits
    grouped = values.astype(np.uint64).reshape(*values.shape[:-1], -1, per)
    word = np.zeros(grouped.shape[:-1], dtype=np.uint64)
    for i, src in enumerate(order):
        word |= grouped[..., src] << np.uint64(bits * i)
    return word.astype(np.uint32).view(np.int32)


def pack_awq(q: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    codes = q["codes"].numpy().T  # [in, out]
    zeros = q["zeros"].numpy().T  # [groups, out]
    return {
        "qweight": torch.from_numpy(_words(codes, 4, AWQ_ORDER)),
        "qzeros": torch.from_numpy(_words(zeros, 4, AWQ_ORDER)),
        "scales": q["scales"].T.contiguous(),
    }


def pack_gptq(
    q: dict[str, torch.Tensor], bits: int, v1: bool, group: int
) -> dict[str, torch.Tensor]:
    order = list(range(32 // bits))
    codes = q["codes"].numpy()  # [out, in]: packing along the input = the last dim here
    zeros = q["zeros"].numpy().T - (1 if v1 else 0)  # [groups, out]
    inp = codes.shape[1]
    return {
        "qweight": torch.from_numpy(np.ascontiguousarray(_words(codes, bits, order).T)),
        "qzeros": torch.from_numpy(_words(zeros, bits, order)),
        "scales": q["scales"].T.contiguous(),
        "g_idx": torch.arange(inp, dtype=torch.int32) // group,
    }


Make = Callable[[int, int, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def group_maker(
    bits: int, group: int, pack: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> Make:
    """Known codes for an ``[out, in]`` layer: (the float values they mean, packed tensors)."""

    def make(
        out: int, inp: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q = known_codes(out, inp, bits, group, gen)
        return dequantize(q, group), pack(q)

    return make


def write_twins(
    arch: str, root: Path, quantization_config: dict[str, Any], make: Make, seed: int = 0
) -> tuple[Path, Path]:
    """(quantized folder, float twin folder) of a tiny ``arch`` model whose dense layers are
    made by ``make``."""
    float_dir, quant_dir = root / f"{arch}-float", root / f"{arch}-quant"
    model = build_tiny_model(arch, float_dir, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    quantized: dict[str, torch.Tensor] = {}
    for name in list(state):
        module, _, kind = name.rpartition(".")
        if kind != "weight" or module.rpartition(".")[2] not in DENSE:
            continue
        out, inp = state[name].shape
        state[name], parts = make(out, inp, gen)
        for part, tensor in parts.items():
            quantized[f"{module}.{part}"] = tensor.contiguous()
    model.load_state_dict(state)
    model.save_pretrained(float_dir, safe_serialization=True)
    quant_dir.mkdir()
    floats = {k: v for k, v in state.items() if k not in quantized and not _replaced(k, quantized)}
    if model.config.tie_word_embeddings:
        floats.pop("lm_head.weight", None)
    save_file({**floats, **quantized}, str(quant_dir / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (quant_dir / "config.json").write_text(json.dumps(config))
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, quant_dir / item.name)
    return quant_dir, float_dir


def _replaced(name: str, quantized: dict[str, torch.Tensor]) -> bool:
    """Whether float tensor ``name`` is a weight whose module the checkpoint stores quantized."""
    module, _, kind = name.rpartition(".")
    return kind == "weight" and any(k.startswith(module + ".") for k in quantized)


# GGUF -----------------------------------------------------------------------------------------

GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    module, _, kind = hf.rpartition(".")
    if module in GGUF_GLOBAL:
        return f"{GGUF_GLOBAL[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER[rest]}.{kind}"


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reordering of q/k rows (pairs interleaved per head)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_gguf(
    model: Any, path: Path, types: Callable[[str, np.ndarray], Any], arch: str = "llama"
) -> None:
    """A GGUF file of a tiny HF ``model`` as llama.cpp's converter writes it: metadata, the
    built-in tokenizer, and every tensor in the type ``types(gguf_name, array)`` returns
    (a ``GGMLQuantizationType``), quantized with ``gguf.quants``."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(
        float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    )
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        array = tensor.detach().float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        target = gguf_name(name)
        kind = types(target, array) if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(array, kind) if kind != gguf.GGMLQuantizationType.F32 else array
        writer.add_tensor(target, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: Any) -> None:
    """The built-in byte-level BPE tokenizer as GGUF's ``gpt2`` tokenizer metadata."""
    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["id"] for t in data["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(
        [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    )
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """What llama.cpp's converter writes as ``rope_freqs.weight`` for ``rope_type: llama3``."""
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    old = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    smooth = (old / wavelen - low) / (high - low)
    middle = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, middle))
    return out.astype(np.float32)
