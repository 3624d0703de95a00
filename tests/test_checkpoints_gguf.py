"""GGUF files: tiny models written with ``gguf.GGUFWriter`` as llama.cpp's converter writes
them (q/k rows permuted for llama), loaded by ``LLM(model="x.gguf")``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("onnxruntime")

from hwlm import LLM, SamplingParams  # noqa: E402
from hwlm.backends import cpu_quant  # noqa: E402
from hwlm.backends.cpu import CPUBackend  # noqa: E402
from hwlm.bench.quality import stream_logits, token_stream  # noqa: E402
from hwlm.config import ModelConfig  # noqa: E402
from hwlm.models import CausalLM  # noqa: E402
from hwlm.models.checkpoints.gguf_tensors import unpermute_rows  # noqa: E402
from hwlm.models.layers import Linear  # noqa: E402
from hwlm.models.loader import load_model, resolve_model  # noqa: E402
from tests.checkpoint_writers import gguf_name, write_gguf  # noqa: E402
from tests.tiny_models import build_tiny_model  # noqa: E402

Q = gguf.GGMLQuantizationType
PROMPTS = [[5, 17, 300, 42], [900, 3]]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HWLM_QUANT_CACHE", str(tmp_path / "quant-cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    out: dict[str, Path] = {}
    for arch in ("llama", "qwen2", "qwen3"):
        model = build_tiny_model(arch, root / f"{arch}-hf")
        out[f"{arch}-hf"] = root / f"{arch}-hf"
        out[f"{arch}-f32"] = root / f"{arch}-f32.gguf"
        write_gguf(model, out[f"{arch}-f32"], lambda name, a: Q.F32, arch)
    llama = build_tiny_model("llama", root / "again")
    for kind in (Q.Q8_0, Q.Q4_0):
        out[kind.name] = root / f"llama-{kind.name}.gguf"
        write_gguf(llama, out[kind.name], lambda name, a, kind=kind: kind)
    return out


def _greedy(model: Path) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(model=str(model), device="cpu", max_model_len=64)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_float_file_generates_what_the_hf_folder_does(files: dict[str, Path]) -> None:
    assert _greedy(files["llama-f32"]) == _greedy(files["llama-hf"])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_float_file_computes_what_the_hf_folder_does(files: dict[str, Path], arch: str) -> None:
    """The same float weights, in the same places: bit-equal logits (qwen2: no q/k permutation,
    biases on q/k/v; qwen3: q/k norms, head_dim from key_length)."""
    tokens = token_stream(1024, 64)
    backend = CPUBackend()
    want = stream_logits(_load(files[f"{arch}-hf"]), backend, tokens)
    assert torch.equal(stream_logits(_load(files[f"{arch}-f32"]), backend, tokens), want)


def test_llama3_rope_scaling_is_read_back(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    model = build_tiny_model("llama", tmp_path / "hf", rope_parameters=rope)
    write_gguf(model, tmp_path / "r.gguf", lambda name, a: Q.F32)
    config = resolve_model(str(tmp_path / "r.gguf")).hf_config
    assert config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    tokens = token_stream(1024, 64)
    backend = CPUBackend()
    want = stream_logits(_load(tmp_path / "hf"), backend, tokens)
    assert torch.equal(stream_logits(_load(tmp_path / "r.gguf"), backend, tokens), want)


def test_tokenizer_and_config_come_from_the_file(files: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    llm = LLM(model=str(files["llama-f32"]), device="cpu", max_model_len=64)
    text = "Hello world, this is a test <|im_end|>"
    reference = AutoTokenizer.from_pretrained(str(files["llama-hf"]))
    assert llm.get_tokenizer().encode(text) == reference.encode(text)
    config = resolve_model(str(files["llama-f32"])).hf_config
    assert (config["num_key_value_heads"], config["tie_word_embeddings"]) == (2, False)


def _load(path: Path, **kwargs: Any) -> CausalLM:
    resolved = resolve_model(str(path))
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    return load_model(resolved, config, CPUBackend(), torch.float32, **kwargs)


def _file_values(reader: Any, name: str, heads: int) -> torch.Tensor:
    """gguf's own dequantization of tensor ``name``, q/k rows put back in HF order."""
    tensor = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    values = torch.from_numpy(
        np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
    )
    return unpermute_rows(values, heads) if heads else values


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_exact_types_run_as_stored(files: dict[str, Path], kind: str) -> None:
    model = _load(files[kind])
    reader = gguf.GGUFReader(str(files[kind]))
    cfg = model.config
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        assert isinstance(module.kernel, cpu_quant.ORT_LAYERS), f"{name}: not MatMulNBits"
        parts = [name] if module is model.lm_head else _shard_names(name)
        expected = torch.cat(
            [_file_values(reader, gguf_name(p + ".weight"), _heads(p, cfg)) for p in parts]
        )
        assert torch.equal(module.kernel.dequantized_weight(), expected), name
    embed = _file_values(reader, "token_embd.weight", 0)
    assert torch.equal(model.model.embed_tokens.weight, embed)


def test_quantization_setting_against_the_file(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="quantization='int8' does not match the checkpoint"):
        _load(files["Q4_0"], quantization="int8")
    _load(files["Q4_0"], quantization="int4")
    model = _load(files["llama-f32"], quantization="int4")  # a float file quantizes at load
    assert isinstance(model.model.layers[0].mlp.down_proj.kernel, cpu_quant.ORT_LAYERS)


def test_k_quants_are_dequantized_once(tmp_path: Path) -> None:
    """Q4_K and Q6_K (as in Q4_K_M files) have no exact group layout: their values are
    dequantized into float layers. ``gguf`` cannot quantize them, so the test writes random
    blocks with sane scales."""
    model = build_tiny_model("llama", tmp_path / "hf", hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    path = tmp_path / "k.gguf"
    chosen = {
        "blk.0.attn_q.weight": Q.Q4_K,
        "blk.0.attn_k.weight": Q.Q6_K,
        "blk.0.ffn_down.weight": Q.Q6_K,
    }
    mixed = {"blk.0.ffn_gate.weight": Q.Q4_0}  # gate Q4_0 with up Q8_0: not one layout either
    write_gguf(model, path, lambda name, a: mixed.get(name, Q.F32 if name in chosen else Q.Q8_0))
    _rewrite_as_k_quants(path, chosen, tmp_path / "k2.gguf")
    loaded = _load(tmp_path / "k2.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "k2.gguf"))
    attn = loaded.model.layers[0].self_attn.qkv_proj
    assert attn.kernel is None, "a K-quant shard must make the fused layer float"
    q, k, _ = attn.weight.split(attn.output_sizes)
    assert torch.equal(q, _file_values(reader, "blk.0.attn_q.weight", 4))
    assert torch.equal(k, _file_values(reader, "blk.0.attn_k.weight", 2))
    down = loaded.model.layers[0].mlp.down_proj
    assert down.kernel is None
    assert torch.equal(down.weight, _file_values(reader, "blk.0.ffn_down.weight", 0))
    gate_up = loaded.model.layers[0].mlp.gate_up_proj
    assert gate_up.kernel is None
    assert torch.equal(gate_up.weight[:256], _file_values(reader, "blk.0.ffn_gate.weight", 0))
    assert isinstance(loaded.model.layers[0].self_attn.o_proj.kernel, cpu_quant.ORT_LAYERS)


def test_unreadable_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tensor("x.weight", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="has architecture 'bert'; hwlm reads"):
        resolve_model(str(tmp_path / "bert.gguf"))


def _shard_names(fused: str) -> list[str]:
    if fused.endswith("qkv_proj"):
        base = fused.removesuffix("qkv_proj")
        return [base + p for p in ("q_proj", "k_proj", "v_proj")]
    if fused.endswith("gate_up_proj"):
        base = fused.removesuffix("gate_up_proj")
        return [base + p for p in ("gate_proj", "up_proj")]
    return [fused]


def _heads(name: str, cfg: ModelConfig) -> int:
    return (
        cfg.num_heads
        if name.endswith("q_proj")
        else cfg.num_kv_heads
        if name.endswith("k_proj")
        else 0
    )


def _rewrite_as_k_quants(source: Path, chosen: dict[str, Any], target: Path) -> None:
    """A copy of ``source`` whose ``chosen`` tensors are random K-quant blocks."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, kind)
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        shape = tuple(reversed(tensor.shape.tolist()))
        if tensor.name in chosen:
            writer.add_tensor(
                tensor.name,
                _random_blocks(chosen[tensor.name], shape, rng),
                raw_dtype=chosen[tensor.name],
            )
        else:
            data = np.asarray(tensor.data)
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _random_blocks(kind: Any, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = (
        np.full((rows, cols // block), 0.01, dtype=np.float16).view(np.uint8).reshape(rows, -1, 2)
    )
    if kind == Q.Q4_K:  # d, dmin, then scales and codes
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K: codes, scales, then d last
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)
