"""Models and loader against transformers: tiny random checkpoints, logits compared per token.

Each hwlm forward runs all prompts as one flattened batch over a paged KV cache (block size 4,
blocks handed out in reverse order), in two steps: a first chunk of every prompt, then the rest
on top of the cached prefix, so positions, cache writes and the prefix reads are all exercised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hwlm import presets
from hwlm.attention import AttentionMetadata, ForwardContext
from hwlm.backends.reference import ReferenceBackend
from hwlm.config import ModelConfig
from hwlm.models import CausalLM
from hwlm.models.loader import ResolvedModel, load_model, resolve_model

VOCAB = 512
BLOCK = 4
TOL = 1e-4
BACKEND = ReferenceBackend()

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
_DECODER: dict[str, Any] = dict(_COMMON, intermediate_size=96, num_key_value_heads=2)
_DECODER["initializer_range"] = 0.2  # large enough that logits are far from uniform

ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("Llama", dict(_DECODER)),
    "llama-bias": ("Llama", dict(_DECODER, attention_bias=True, mlp_bias=True)),
    "llama-tied": ("Llama", dict(_DECODER, tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": ("Mistral", dict(_DECODER, sliding_window=None)),
    "qwen2": ("Qwen2", dict(_DECODER, tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(_DECODER, head_dim=32, attention_bias=True)),
    "opt": ("OPT", dict(_COMMON, ffn_dim=96, init_std=0.2, tie_word_embeddings=True)),
    "opt-350m-style": (
        "OPT",
        dict(
            _COMMON,
            ffn_dim=96,
            init_std=0.2,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
        ),
    ),
}


def make_hf_model(prefix: str, folder: Path, seed: int = 0, **kwargs: Any) -> Any:
    """A random float32 transformers model, saved to ``folder`` with safetensors."""
    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    with torch.no_grad():  # transformers inits biases to 0 and norms to 1: make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def load_hwlm(folder: Path | str, load_format: str = "auto") -> CausalLM:
    resolved = resolve_model(str(folder), load_format)
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    return load_model(resolved, config, BACKEND, torch.float32, load_format)


def _decoder(model: CausalLM) -> Any:
    """``model.model``, untyped: mypy types nn.Module attributes as ``Tensor | Module``."""
    return model.model


def run_hwlm(model: CausalLM, prompts: list[list[int]], first_chunk: int = 3) -> list[torch.Tensor]:
    """Logits of every prompt token, computed in two batched steps over a paged cache."""
    config = model.config
    max_blocks = max(math.ceil(len(p) / BLOCK) for p in prompts)
    num_blocks = max_blocks * len(prompts) + 1
    kv_caches = BACKEND.allocate_kv_cache(
        config.num_layers, num_blocks, BLOCK, config.num_kv_heads, config.head_size, torch.float32
    )
    order = list(range(num_blocks - 1, 0, -1))  # block 0 unused, the rest in reverse
    tables = [order[i * max_blocks : (i + 1) * max_blocks] for i in range(len(prompts))]
    done = [0] * len(prompts)
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in range(2):
        ends = [min(first_chunk, len(p)) if step == 0 else len(p) for p in prompts]
        ids, pos, slots, starts = [], [], [], [0]
        for i, p in enumerate(prompts):
            for t in range(done[i], ends[i]):
                ids.append(p[t])
                pos.append(t)
                slots.append(tables[i][t // BLOCK] * BLOCK + t % BLOCK)
            starts.append(len(ids))
        query_lens = [e - d for e, d in zip(ends, done, strict=True)]
        metadata = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(ends, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(query_lens),
            max_seq_len=max(ends),
        )
        ctx = ForwardContext(BACKEND, kv_caches, metadata)
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), torch.tensor(pos), ctx)
            out = model.compute_logits(hidden)
        assert out.dtype == torch.float32 and out.shape == (len(ids), config.vocab_size)
        for i in range(len(prompts)):
            logits[i].append(out[starts[i] : starts[i + 1]])
        done = ends
    return [torch.cat(chunks) for chunks in logits]


def hf_logits(hf_model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf_model(torch.tensor([p])).logits[0].float() for p in prompts]


def make_prompts(lengths: tuple[int, ...] = (7, 13, 2), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def assert_matches(model: CausalLM, hf_model: Any, prompts: list[list[int]]) -> None:
    ours, ref = run_hwlm(model, prompts), hf_logits(hf_model, prompts)
    assert max(r.std().item() for r in ref) > 0.1, "reference logits are near-uniform"
    assert max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(arch: str, tmp_path: Path) -> None:
    prefix, kwargs = ARCHS[arch]
    hf_model = make_hf_model(prefix, tmp_path, **kwargs)
    model = load_hwlm(tmp_path)
    assert_matches(model, hf_model, make_prompts())


ROPE_SCALINGS: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(kind: str, tmp_path: Path) -> None:
    kwargs = dict(_DECODER, rope_scaling=dict(ROPE_SCALINGS[kind]), head_dim=16)
    hf_model = make_hf_model("Llama", tmp_path, **kwargs)
    prompts = make_prompts((20, 9, 14))
    model = load_hwlm(tmp_path)
    assert model.config.rope_scaling and model.config.rope_scaling["rope_type"] == kind
    assert_matches(model, hf_model, prompts)
    # The scaling must matter: the same weights with plain rope give other logits.
    plain = resolve_model(str(tmp_path), "auto")
    hf = {k: v for k, v in plain.hf_config.items() if k not in ("rope_scaling", "rope_parameters")}
    unscaled = load_model(plain, ModelConfig.from_hf_dict(hf), BACKEND, torch.float32)
    assert max_diff(run_hwlm(unscaled, prompts), hf_logits(hf_model, prompts)) > 1e-2


def test_dynamic_rope_matches_transformers_at_full_length(tmp_path: Path) -> None:
    # hwlm fixes the NTK base at max_position_embeddings * factor (as vLLM); transformers
    # derives it from the sequence length, so the two agree for a sequence of exactly that length.
    kwargs = dict(_DECODER, max_position_embeddings=16)
    kwargs["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    hf_model = make_hf_model("Llama", tmp_path, **kwargs)
    assert_matches(load_hwlm(tmp_path), hf_model, make_prompts((32,)))


def test_tied_embeddings_share_storage(tmp_path: Path) -> None:
    for tied in (True, False):
        folder = tmp_path / str(tied)
        make_hf_model("Qwen2", folder, **dict(_DECODER, tie_word_embeddings=tied))
        model = load_hwlm(folder)
        shared = model.lm_head.weight is _decoder(model).embed_tokens.weight
        assert shared == tied
        has_head = "lm_head.weight" in load_file(folder / "model.safetensors")
        assert has_head == (not tied)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**_DECODER)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()  # type: ignore[no-untyped-call]
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_matches(load_hwlm(tmp_path), hf_model, make_prompts())


def test_bin_checkpoint_without_model_prefix(tmp_path: Path) -> None:
    # facebook/opt-* checkpoints store OPTModel's names ("decoder.*") in pytorch_model.bin.
    hf_model = make_hf_model("OPT", tmp_path, **ARCHS["opt"][1])
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in hf_model.model.state_dict().items()}
    assert all(k.startswith("decoder.") for k in state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_matches(load_hwlm(tmp_path), hf_model, make_prompts())
    with pytest.raises(ValueError, match=r"no weights \(\*\.safetensors\)"):
        load_hwlm(tmp_path, "safetensors")


def test_extra_buffers_are_ignored(tmp_path: Path) -> None:
    hf_model = make_hf_model("Llama", tmp_path, **_DECODER)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, tmp_path / "model.safetensors")
    assert_matches(load_hwlm(tmp_path), hf_model, make_prompts())


def _edit_checkpoint(folder: Path, edit: Any) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_checkpoint_mismatch_errors(tmp_path: Path) -> None:
    make_hf_model("Llama", tmp_path, **_DECODER)
    original = load_file(tmp_path / "model.safetensors")

    _edit_checkpoint(tmp_path, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing 1 weights \(model\.layers\.1\.self_attn\.qkv_proj"
    ):
        load_hwlm(tmp_path)

    save_file(original, tmp_path / "model.safetensors")
    _edit_checkpoint(
        tmp_path, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.ones(2)})
    )
    with pytest.raises(ValueError, match=r"unknown weights \(model\.layers\.0\.mlp\.extra\.weight"):
        load_hwlm(tmp_path)

    save_file(original, tmp_path / "model.safetensors")
    _edit_checkpoint(tmp_path, lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(65,\)"):
        load_hwlm(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_hwlm(tmp_path)


def test_unknown_architecture(tmp_path: Path) -> None:
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    resolved = resolve_model(str(tmp_path), "auto")
    with pytest.raises(ValueError, match="unknown architecture.*GPT2LMHeadModel"):
        ModelConfig.from_hf_dict(resolved.hf_config)


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-model"])
def test_missing_model_path(path: str) -> None:
    with pytest.raises(ValueError, match=f"model path '{path}' does not exist"):
        resolve_model(path, "auto")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder with a config.json"):
        resolve_model(str(tmp_path), "auto")


def test_unknown_load_format() -> None:
    with pytest.raises(ValueError, match="unknown load_format 'npz'"):
        resolve_model(presets.TINY_MODEL, "npz")


def test_hub_failure_is_one_line_value_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="cannot get model 'no-such-org/no-such-model'") as info:
        resolve_model("no-such-org/no-such-model", "auto")
    assert "\n" not in str(info.value)


def test_mistyped_preset_names_the_closest_and_lists_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="unknown model 'hwlm-tiyn'") as info:
        resolve_model("hwlm-tiyn", "auto")
    message = str(info.value)
    assert "\n" not in message
    assert "did you mean 'hwlm-tiny'?" in message
    assert all(name in message for name in presets.list_presets())


def test_preset_hint() -> None:
    assert presets.preset_hint("Meta-Llama-3-8").startswith("did you mean 'llama-3-8b'? presets: ")
    assert presets.preset_hint("qwen3").startswith("did you mean 'qwen3-0.6b'? ")
    assert presets.preset_hint("xyzzy") == "presets: " + ", ".join(presets.list_presets())


# --- presets -----------------------------------------------------------------------------------

EXPECTED_PRESETS = {
    "qwen2.5-0.5b": ("qwen2", 24, 896, 14, 2, 64, 151936, True, torch.bfloat16),
    "qwen3-0.6b": ("qwen3", 28, 1024, 16, 8, 128, 151936, True, torch.bfloat16),
    "llama-3-8b": ("llama", 32, 4096, 32, 8, 128, 128256, False, torch.bfloat16),
    "llama-3-70b": ("llama", 80, 8192, 64, 8, 128, 128256, False, torch.bfloat16),
    "opt-125m": ("opt", 12, 768, 12, 12, 64, 50272, True, torch.float16),
    "c1-llama": ("llama", 12, 768, 12, 4, 64, 32000, False, torch.float32),
    "hwlm-tiny": ("llama", 4, 256, 4, 2, 64, 1024, False, torch.float32),
}


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_preset_configs_parse(name: str) -> None:
    assert name in presets.list_presets()
    config = ModelConfig.from_hf_dict(presets.get_preset(name) or {})
    got = (
        config.family,
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_size,
        config.vocab_size,
        config.tie_word_embeddings,
        config.dtype,
    )
    assert got == EXPECTED_PRESETS[name]
    assert config.eos_token_ids and config.bos_token_id is not None


def test_preset_names_and_hub_ids() -> None:
    for name in ("Qwen/Qwen2.5-0.5B", "QWEN2.5-0.5B", "qwen2.5-0.5b"):
        resolved = resolve_model(name, "dummy")
        assert resolved.hf_config["hidden_size"] == 896 and resolved.weights_path is None
    assert presets.get_preset("meta-llama/Meta-Llama-3-8B") == presets.get_preset("llama-3-8b")
    assert presets.get_preset("no-such-preset") is None
    with pytest.raises(ValueError, match="must come from a local folder or the hub"):
        resolve_model("qwen3-0.6b", "auto")
    with pytest.raises(ValueError, match="must come from a local folder or the hub"):
        resolve_model("c1-llama", "auto")


def test_preset_found_in_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hub_constants

    repo = tmp_path / "models--Qwen--Qwen2.5-0.5B"
    snapshot = repo / "snapshots" / ("a" * 40)
    hf_model = make_hf_model("Qwen2", snapshot, **dict(_DECODER, tie_word_embeddings=True))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    resolved = resolve_model("qwen2.5-0.5b", "auto")
    assert resolved.weights_path == str(snapshot) and resolved.hf_config["hidden_size"] == 64
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    model = load_model(resolved, config, BACKEND, torch.float32, "auto")
    assert max_diff(run_hwlm(model, make_prompts()), hf_logits(hf_model, make_prompts())) <= TOL


def test_tiny_model_builds_with_dummy_weights() -> None:
    resolved = resolve_model(presets.TINY_MODEL, "auto")  # no weights needed for the tiny model
    assert resolved.weights_path is None
    assert Path(resolved.tokenizer_path) == presets.TOKENIZER_DIR
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    model = load_model(resolved, config, BACKEND, torch.float32, "auto", seed=3)
    again = load_model(resolved, config, BACKEND, torch.float32, "dummy", seed=3)
    other = load_model(resolved, config, BACKEND, torch.float32, "dummy", seed=4)
    w = _decoder(model).layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w, _decoder(again).layers[0].self_attn.qkv_proj.weight)
    assert not torch.equal(w, _decoder(other).layers[0].self_attn.qkv_proj.weight)
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.all(_decoder(model).norm.weight == 1)
    logits = run_hwlm(model, [[0, 5, 9, 300, 7], [1023, 2]])
    assert all(torch.isfinite(x).all() for x in logits)


def _shrink(hf: dict[str, Any]) -> dict[str, Any]:
    small = dict(hf, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256)
    small.update(intermediate_size=128) if "intermediate_size" in hf else small.update(ffn_dim=128)
    if "num_key_value_heads" in hf:
        small["num_key_value_heads"] = 2
    if "head_dim" in hf:
        small["head_dim"] = 32
    if "word_embed_proj_dim" in hf:
        small["word_embed_proj_dim"] = 64
    return small


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_shrunken_presets_run_with_dummy_weights(name: str) -> None:
    hf = _shrink(presets.get_preset(name) or {})
    config = ModelConfig.from_hf_dict(hf)
    resolved = ResolvedModel(hf, None, str(presets.TOKENIZER_DIR), name)
    model = load_model(resolved, config, BACKEND, config.dtype, "dummy")
    assert all(p.dtype == config.dtype for p in model.parameters())
    # Run in float32 too, where the reference attention is exact enough to expect finite values.
    for dtype in {config.dtype, torch.float32}:
        model = model.to(dtype)
        kv_caches = BACKEND.allocate_kv_cache(
            config.num_layers, 4, BLOCK, config.num_kv_heads, config.head_size, dtype
        )
        metadata = AttentionMetadata(
            query_start_loc=torch.tensor([0, 6], dtype=torch.int32),
            seq_lens=torch.tensor([6], dtype=torch.int32),
            block_tables=torch.tensor([[1, 2]], dtype=torch.int32),
            slot_mapping=torch.arange(4, 10),
            max_query_len=6,
            max_seq_len=6,
        )
        with torch.inference_mode():
            hidden = model(
                torch.arange(6) * 40, torch.arange(6), ForwardContext(BACKEND, kv_caches, metadata)
            )
            logits = model.compute_logits(hidden)
        assert logits.shape == (6, 256) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all() and logits.std() > 0
