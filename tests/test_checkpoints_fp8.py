"""fp8 checkpoints (HF ``quant_method: fp8``, block-wise or per tensor, and compressed-tensors
float8 per channel): tiny models written from known e4m3 codes load into layers with the
values the codes mean; the cpu backend, which has no fp8 kernel, runs them dequantized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hwlm.backend import DequantizedLinear
from hwlm.backends.reference import ReferenceBackend
from hwlm.bench.quality import compare, stream_logits, token_stream
from hwlm.config import ModelConfig
from hwlm.models import CausalLM
from hwlm.models.checkpoints.fp8 import from_blocks
from hwlm.models.layers import Linear
from hwlm.models.loader import load_model, resolve_model
from tests.checkpoint_writers import Make, write_twins

BLOCK = 32


def fp8_maker(scheme: str) -> Make:
    """e4m3 codes with a block, tensor or channel scale: (the values, the checkpoint tensors)."""

    def make(
        out: int, inp: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes = (torch.randn(out, inp, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        if scheme == "block":
            scale = torch.rand(-(-out // BLOCK), -(-inp // BLOCK), generator=gen) * 2e-3 + 1e-3
            full = scale.repeat_interleave(BLOCK, 0)[:out].repeat_interleave(BLOCK, 1)[:, :inp]
            return codes.float() * full, {"weight": codes, "weight_scale_inv": scale}
        if scheme == "tensor":
            scale = torch.rand((), generator=gen) * 2e-3 + 1e-3
            return codes.float() * scale, {"weight": codes, "weight_scale": scale}
        scale = torch.rand(out, 1, generator=gen) * 2e-3 + 1e-3
        return codes.float() * scale, {"weight": codes, "weight_scale": scale}

    return make


CT_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
}
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "fp8-block": ("qwen2", {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}, "block"),
    "fp8-tensor": ("llama", {"quant_method": "fp8", "activation_scheme": "dynamic"}, "tensor"),
    "compressed-channel": ("llama", CT_CONFIG, "channel"),
}


@pytest.fixture(scope="module", params=list(CASES))
def twins(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    arch, config, scheme = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    return (scheme, *write_twins(arch, root, config, fp8_maker(scheme)))


def _load(folder: Path, **kwargs: Any) -> CausalLM:
    resolved = resolve_model(str(folder))
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    return load_model(resolved, config, ReferenceBackend(), torch.float32, **kwargs)


def test_layers_hold_the_codes_values(twins: tuple[str, Path, Path]) -> None:
    scheme, quant_dir, float_dir = twins
    model = _load(quant_dir)
    twin = dict(_load(float_dir).named_modules())
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module is model.lm_head:
            continue
        assert isinstance(module.kernel, DequantizedLinear), name
        got, want = module.kernel.dequantized_weight(), twin[name].weight
        if scheme == "block":  # quantized again per channel: one e4m3 rounding per weight
            amax = want.abs().amax(dim=1, keepdim=True)
            bound = want.abs() / 16 + amax / 448 * 2**-9
            assert ((got - want).abs() <= bound).all(), name
            assert not torch.equal(got, want)
        else:
            assert torch.equal(got, want), name
        checked += 1
    assert checked == 8


def test_model_computes_what_its_float_twin_computes(twins: tuple[str, Path, Path]) -> None:
    scheme, quant_dir, float_dir = twins
    tokens = token_stream(1024, 64)
    backend = ReferenceBackend()
    want = stream_logits(_load(float_dir), backend, tokens)
    got = stream_logits(_load(quant_dir), backend, tokens)
    if scheme == "block":  # measured KL 0.015, top-1 0.78 (sharp tiny-model distributions)
        kl, _, top1, _ = compare(want, got)
        assert kl < 0.05 and top1 >= 0.6, f"KL {kl:.4f}, top-1 {top1:.2f}"
    else:
        assert torch.equal(got, want)


def test_quantization_setting_must_match(twins: tuple[str, Path, Path]) -> None:
    with pytest.raises(ValueError, match="quantization='int4' does not match the checkpoint"):
        _load(twins[1], quantization="int4")


def test_block_scales_must_fit_the_weight() -> None:
    codes = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="block scales of shape .3, 2. for a 64x64 weight"):
        from_blocks(codes, torch.ones(3, 2), (32, 32), "layer")
