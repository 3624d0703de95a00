"""``kv_cache_dtype="bfloat16"`` on the cpu backend: the setting, the cache's size, and the
quality it costs. The kernels' conformance is in tests/conformance/test_ops_kv_bf16.py; end to
end in tests/conformance/test_e2e_greedy.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from hwlm import LLM, SamplingParams, presets
from hwlm.backends.cpu import CPUBackend
from hwlm.config import kv_cache_torch_dtype
from hwlm.engine.llm_engine import LLMEngine
from hwlm.engine_args import EngineArgs, add_cli_args, from_cli_args

# Measured on hwlm-tiny's shape (dummy weights, 128 tokens): mean KL 2.4e-7 nats, top-1 100%
# (C1's shape, 256 tokens: 1.0e-6, 99.2%). bfloat16 keeps 8 mantissa bits, so scores move by
# ~2^-9 of themselves; a cache read with the wrong widening or the wrong rows measures KL in the
# tenths. The bounds leave about 10x.
KV_BF16_MAX_MEAN_KL = 3e-6
KV_BF16_MIN_TOP1 = 0.95


def test_setting_from_the_cli_and_its_dtype() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="m")
    add_cli_args(parser)
    args = from_cli_args(parser.parse_args(["--kv-cache-dtype", "bfloat16"]))
    assert args.kv_cache_dtype == "bfloat16"
    assert kv_cache_torch_dtype("bfloat16", torch.float32) == torch.bfloat16


def _engine(kv_cache_dtype: str) -> LLMEngine:
    return LLMEngine(
        EngineArgs(
            model="hwlm-tiny",
            device="cpu",
            load_format="dummy",
            max_model_len=256,
            kv_cache_dtype=kv_cache_dtype,
        )
    )


def test_bfloat16_cache_holds_twice_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CPUBackend, "memory_budget", lambda self, utilization: 8 << 20)
    auto, half = _engine("auto"), _engine("bfloat16")
    assert auto.runner.kv_caches[0].dtype == torch.float32
    assert half.runner.kv_caches[0].dtype == torch.bfloat16
    assert auto.block_manager.num_blocks < auto.config.max_num_seqs * 16  # the budget binds
    assert half.block_manager.num_blocks == 2 * auto.block_manager.num_blocks


def test_generation_matches_the_float32_cache_on_most_tokens() -> None:
    """A float32 model decodes over either cache; greedy tokens agree but for near-ties."""
    prompts = [[5, 9, 200, 31, 7], list(range(40, 90))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = {}
    for kv in ("auto", "bfloat16"):
        llm = LLM("hwlm-tiny", device="cpu", load_format="dummy", kv_cache_dtype=kv)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs[kv] = [o.outputs[0].token_ids for o in outs]
    same = sum(
        a == b
        for x, y in zip(runs["auto"], runs["bfloat16"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    assert same >= 0.9 * 2 * 24, runs


def test_bfloat16_cache_quality_is_bounded(tmp_path: Path) -> None:
    from hwlm.bench.kv_quality import measure_kv_cache

    config = json.loads((Path(presets.__file__).parent / "hwlm-tiny.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    [result] = measure_kv_cache(
        str(tmp_path), ["bfloat16"], 128, load_format="dummy", backend=CPUBackend()
    )
    assert 0 < result.mean_kl <= KV_BF16_MAX_MEAN_KL, result
    assert result.top1_agreement >= KV_BF16_MIN_TOP1, result
