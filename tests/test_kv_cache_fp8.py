"""``kv_cache_dtype="fp8"``: the setting, the refusals, the cache's size, the per-layer scales,
and the quality it costs. The kernels' conformance is in tests/conformance/test_ops_kv_fp8.py;
end to end in tests/conformance/test_e2e_greedy.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from hwlm import presets
from hwlm.attention import AttentionMetadata, ForwardContext
from hwlm.backends.reference import ReferenceBackend
from hwlm.config import EngineConfig, kv_cache_torch_dtype
from hwlm.engine.llm_engine import LLMEngine
from hwlm.engine_args import EngineArgs, add_cli_args, from_cli_args, from_kwargs
from hwlm.kernels.reference import to_fp8
from hwlm.models.layers import Attention
from hwlm.sampling_params import SamplingParams

FP8 = torch.float8_e4m3fn


def test_setting_reaches_engine_args_from_kwargs_and_cli() -> None:
    assert from_kwargs("m", {"kv_cache_dtype": "fp8"}).kv_cache_dtype == "fp8"
    assert EngineArgs(model="m").kv_cache_dtype == "auto"
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="m")
    add_cli_args(parser)
    assert from_cli_args(parser.parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):  # argparse refuses values outside the choices
        parser.parse_args(["--kv-cache-dtype", "int8"])


def test_dtype_names() -> None:
    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16) == FP8
    assert kv_cache_torch_dtype("fp8_e4m3", torch.float32) == FP8
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(max_model_len=16, kv_cache_dtype="fp16")


def test_cpu_backend_refuses_fp8_in_one_line() -> None:
    with pytest.raises(ValueError) as info:
        LLMEngine(EngineArgs(model="hwlm-tiny", device="cpu", kv_cache_dtype="fp8"))
    message = str(info.value)
    assert "\n" not in message
    assert (
        "kv_cache_dtype 'fp8' is not supported by the cpu backend (it runs: auto, bfloat16)"
        in message
    )


@pytest.fixture
def reference_device(monkeypatch: pytest.MonkeyPatch) -> str:
    """The pure-torch reference backend as a device, with a small fixed KV budget (8 MiB)."""
    from hwlm import registry

    monkeypatch.setitem(
        registry.BUILTIN_BACKENDS, "reference", "hwlm.backends.reference:ReferenceBackend"
    )
    monkeypatch.setattr(ReferenceBackend, "memory_budget", lambda self, utilization: 8 << 20)
    return "reference"


def _engine(device: str, kv_cache_dtype: str) -> LLMEngine:
    return LLMEngine(
        EngineArgs(
            model="hwlm-tiny",
            device=device,
            dtype="bfloat16",
            load_format="dummy",
            max_model_len=256,
            kv_cache_dtype=kv_cache_dtype,
        )
    )


def test_fp8_cache_holds_twice_the_blocks_of_bfloat16(reference_device: str) -> None:
    auto = _engine(reference_device, "auto")
    fp8 = _engine(reference_device, "fp8")
    assert auto.runner.kv_caches[0].dtype == torch.bfloat16
    assert fp8.runner.kv_caches[0].dtype == FP8
    assert auto.block_manager.num_blocks < auto.config.max_num_seqs * 16  # the budget binds
    assert fp8.block_manager.num_blocks == 2 * auto.block_manager.num_blocks
    # and it serves: greedy steps through the fp8 cache, with the scales passed to the backend
    fp8.add_request("r", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=3))
    while fp8.has_unfinished_requests():
        fp8.step()


def test_attention_layer_uses_its_scales() -> None:
    """The layer's k_scale/v_scale buffers (what a checkpoint's scales fill) reach the cache."""
    torch.manual_seed(0)
    backend = ReferenceBackend()
    layer = Attention(0, 0.125)
    layer.k_scale.fill_(2.0)
    layer.v_scale.fill_(0.25)
    [cache] = backend.allocate_kv_cache(1, 2, 4, 1, 8, FP8)
    q, k, v = (torch.randn(3, n, 8) for n in (2, 1, 1))
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32),
        block_tables=torch.tensor([[1, 0]], dtype=torch.int32),
        slot_mapping=torch.tensor([4, 5, 6]),
        max_query_len=3,
        max_seq_len=3,
    )
    out = layer(q, k, v, ForwardContext(backend, [cache], metadata))
    stored = cache[:, 1, :3].float()
    assert torch.equal(stored[0], to_fp8(k, torch.tensor(2.0)).float())
    assert torch.equal(stored[1], to_fp8(v, torch.tensor(0.25)).float())
    # attention reads fp8 * scale: the result is near the unquantized one (fp8's few percent)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).expand(2, 3, 8), v.transpose(0, 1).expand(2, 3, 8),
        is_causal=True, scale=0.125,
    ).transpose(0, 1).reshape(3, 16)  # fmt: skip
    assert (out - exact).abs().max().item() < 0.1


# Quality bounds for an fp8 cache on hwlm-tiny's shape (dummy weights, 128 tokens, scale 1.0):
# measured mean KL 5.0e-5 nats, top-1 95.3% (the float32 model's own entropy is 6.88 nats, near
# log(1024): random weights give flat distributions, where near-ties decide top-1). The bounds
# leave 10x on KL; a cache that lost its keys or scales measures KL in the tenths.
KV_FP8_MAX_MEAN_KL = 5e-4
KV_FP8_MIN_TOP1 = 0.85


def test_fp8_cache_quality_is_bounded(tmp_path: Path) -> None:
    from hwlm.bench.kv_quality import measure_kv_cache

    config = json.loads((Path(presets.__file__).parent / "hwlm-tiny.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    [result] = measure_kv_cache(
        str(tmp_path), ["fp8"], 128, load_format="dummy", backend=ReferenceBackend()
    )
    assert 0 < result.mean_kl <= KV_FP8_MAX_MEAN_KL, result
    assert result.top1_agreement >= KV_FP8_MIN_TOP1, result


_COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hwlm.kernels.triton.paged_attention import _attention_kernel
from hwlm.kernels.triton.write_kv import _write_kv_kernel

def compile(fn, types, consts):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

ptrs = dict(kv_cache_ptr="*fp8e4nv", k_scale_ptr="*fp32", v_scale_ptr="*fp32", slot_ptr="*i64")
ptx = compile(_write_kv_kernel, dict(ptrs, key_ptr="*bf16", value_ptr="*bf16"),
              dict(HEAD_SIZE=128, HEAD_PAD=128, BLOCK_H=8, FP8=True))
assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, "write_kv: no saturating e4m3 store"
f32 = {n: "*fp32" for n in ("part_acc_ptr", "part_max_ptr", "part_sum_ptr")}
i32 = {n: "*i32" for n in ("query_start_ptr", "seq_lens_ptr", "block_tables_ptr")}
types = dict(ptrs, **f32, **i32, out_ptr="*bf16", q_ptr="*bf16", scale_log2="fp32")
consts = dict(BLOCK_SIZE=16, HEAD_SIZE=128, HEAD_PAD=128, GROUP=2, GROUP_PAD=2, BLOCK_Q=8,
              BLOCK_N=64, SPLIT=True, UPCAST_DOT=False, FP8=True)
assert "e4m3x2" in compile(_attention_kernel, types, consts), "attention: no e4m3 loads"
"""


def test_fp8_kernels_compile_for_hopper(tmp_path: Path) -> None:
    """The fp8 Triton kernels compile to PTX for sm_90 (no GPU needed), with e4m3 conversions:
    catches what the interpreter accepts and the compiler does not (non-constexpr globals,
    unsupported casts)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
