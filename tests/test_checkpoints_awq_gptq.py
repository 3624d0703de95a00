"""AWQ and GPTQ checkpoints: tiny models written from known codes (packed by the test's own
packers, ``tests/checkpoint_writers``) load into layers whose weights are exactly what the codes
mean, and the whole model computes what its float twin computes."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

from hwlm.backends import cpu_quant  # noqa: E402
from hwlm.backends.cpu import CPUBackend  # noqa: E402
from hwlm.backends.reference import ReferenceBackend  # noqa: E402
from hwlm.bench.quality import compare, stream_logits, token_stream  # noqa: E402
from hwlm.config import ModelConfig  # noqa: E402
from hwlm.models import CausalLM  # noqa: E402
from hwlm.models.layers import Linear  # noqa: E402
from hwlm.models.loader import load_model, resolve_model  # noqa: E402
from tests.checkpoint_writers import group_maker, pack_awq, pack_gptq, write_twins  # noqa: E402

# name -> (arch, quantization_config, bits, group size, packer)
CASES = {
    "awq-llama": ("llama", {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}, 4, 32, pack_awq),
    "gptq-qwen2-v1": ("qwen2", {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}, 4, 32, functools.partial(pack_gptq, bits=4, v1=True, group=32)),
    "gptq8-llama-v2": ("llama", {"quant_method": "gptq", "bits": 8, "group_size": 64, "checkpoint_format": "gptq_v2"}, 8, 64, functools.partial(pack_gptq, bits=8, v1=False, group=64)),
}  # fmt: skip


NEAR_TIE = 0.25  # nats (measured up to 0.07); a wrong layout puts chosen tokens whole nats off


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HWLM_QUANT_CACHE", str(tmp_path / "quant-cache"))


_BUILT: dict[str, tuple[Path, Path]] = {}


def _twins(name: str, factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if name not in _BUILT:
        arch, config, bits, group, pack = CASES[name]
        if name.startswith("awq"):
            pack = functools.partial(pack, bits=bits)
        _BUILT[name] = write_twins(
            arch, factory.mktemp(name), config, group_maker(bits, group, pack)
        )
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(CASES))
def twins(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    return _twins(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gptq_twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _twins("gptq-qwen2-v1", tmp_path_factory)


def _load(folder: Path, backend: object, **kwargs: object) -> CausalLM:
    resolved = resolve_model(str(folder))
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    return load_model(resolved, config, backend, torch.float32, **kwargs)  # type: ignore[arg-type]


def test_layers_hold_exactly_the_codes_values(twins: tuple[Path, Path]) -> None:
    quant_dir, float_dir = twins
    model = _load(quant_dir, CPUBackend())
    twin = dict(_load(float_dir, CPUBackend()).named_modules())
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module is not model.lm_head:
            assert isinstance(module.kernel, cpu_quant.ORT_LAYERS), f"{name}: not MatMulNBits"
            expected = twin[name].weight
            got = module.kernel.dequantized_weight()
            assert torch.equal(got, expected), f"{name}: max diff {(got - expected).abs().max()}"
            if module.bias is not None:  # freed: the kernel adds it
                assert module.bias.numel() == 0
            checked += 1
    assert checked == 2 * 4  # qkv, o, gate_up, down in two layers


def test_model_computes_what_its_float_twin_computes(twins: tuple[Path, Path]) -> None:
    quant_dir, float_dir = twins
    tokens = token_stream(1024, 96)
    # Exact, through the reference backend's default (dequantize once): same values, same math.
    reference = ReferenceBackend()
    want = stream_logits(_load(float_dir, reference), reference, tokens)
    got = stream_logits(_load(quant_dir, reference), reference, tokens)
    assert torch.equal(got, want)
    # Through MatMulNBits on the cpu backend: only its int8 rounding of activations differs.
    cpu = CPUBackend()
    kl, _, top1, _ = compare(want, stream_logits(_load(quant_dir, cpu), cpu, tokens))
    assert kl < 0.01 and top1 >= 0.9, f"KL {kl:.4f}, top-1 {top1:.2f}"


@pytest.mark.parametrize("name", ["awq-llama", "gptq-qwen2-v1"])
def test_greedy_generation_follows_the_float_twin(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Greedy tokens through the engine (MatMulNBits) are the float twin's greedy choices,
    except where the twin itself is within ``NEAR_TIE`` nats of a tie (activation rounding may
    flip those): checked by feeding the generated tokens to the twin."""
    from hwlm import LLM, SamplingParams

    quant_dir, float_dir = _twins(name, tmp_path_factory)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 17, 300, 42], [900, 3]]
    llm = LLM(model=str(quant_dir), device="cpu", max_model_len=64)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    reference = ReferenceBackend()
    twin = _load(float_dir, reference)
    for prompt, output in zip(prompts, outputs, strict=True):
        generated = list(output.outputs[0].token_ids)
        assert len(generated) == 16
        logprobs = stream_logits(twin, reference, prompt + generated).log_softmax(-1)
        steps = logprobs[len(prompt) - 1 : -1]
        chosen = steps.gather(1, torch.tensor(generated)[:, None])[:, 0]
        gaps = steps.max(dim=1).values - chosen
        assert gaps.max() <= NEAR_TIE, f"token {int(gaps.argmax())}: {gaps.max():.3f} nats off"


def _with_config(folder: Path, tmp_path: Path, changes: dict[str, object]) -> Path:
    """A copy of ``folder`` (links) with ``changes`` to its quantization_config."""
    out = tmp_path / "changed"
    out.mkdir()
    for item in folder.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "exl2", "bits": 4}, "checkpoint quantization 'exl2' is not supported"),
        ({"quant_method": "awq", "bits": 8}, "awq with 8-bit weights is not supported"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv' is not"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "gptq checkpoint_format 'marlin'"),
        ({"quant_method": "gptq", "bits": 3}, "gptq with 3-bit weights is not supported"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors format 'pack-quantized'"),
    ],
)  # fmt: skip
def test_unsupported_formats_are_one_clear_error(
    gptq_twins: tuple[Path, Path], tmp_path: Path, config: dict[str, object], message: str
) -> None:
    folder = _with_config(gptq_twins[0], tmp_path, config)
    with pytest.raises(ValueError, match=message) as err:
        _load(folder, CPUBackend())
    assert "\n" not in str(err.value)


def test_act_order_is_refused(gptq_twins: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    quant_dir = gptq_twins[0]
    folder = _with_config(quant_dir, tmp_path, {})
    tensors = load_file(str(quant_dir / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("down_proj.g_idx"))
    tensors[name] = tensors[name].flip(0).contiguous()
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="uses act-order .desc_act"):
        _load(folder, CPUBackend())


def test_quantization_setting_must_match_the_checkpoint(twins: tuple[Path, Path]) -> None:
    quant_dir = twins[0]
    stored = json.loads((quant_dir / "config.json").read_text())["quantization_config"]["bits"]
    other = "int8" if stored == 4 else "int4"
    with pytest.raises(ValueError, match=f"quantization='{other}' does not match the checkpoint"):
        _load(quant_dir, CPUBackend(), quantization=other)
    model = _load(quant_dir, CPUBackend(), quantization=f"int{stored}")
    assert isinstance(model.model.layers[0].mlp.down_proj.kernel, cpu_quant.ORT_LAYERS)
