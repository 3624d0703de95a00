"""Quantized weights end to end: the setting, its errors, and quality bounds on tiny models.

The quality bounds come from measurement (``hwlm.bench.quality`` over 256 tokens of the tiny
random-weight models, whose sharp next-token distributions make int4's rounding visible):
llama int8 mean KL 0.008 nats / top-1 84%, int4 0.36 / 31%; opt int8 0.002 / 93%, int4 0.13 /
52%. The bounds leave about 2x margin, and ``test_bounds_catch_broken_quantization`` shows
that a wrong scale or a wrong weight layout breaks them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from hwlm import LLM, SamplingParams  # noqa: E402
from hwlm.backends import cpu_quant  # noqa: E402
from hwlm.backends.cpu import CPUBackend  # noqa: E402
from hwlm.backends.cpu_quant_graph import read_graph  # noqa: E402
from hwlm.backends.cpu_quant_pack import BlockQuantized, ChannelQuantized  # noqa: E402
from hwlm.backends.reference import ReferenceBackend  # noqa: E402
from hwlm.bench.quality import (  # noqa: E402
    QualityResult,
    compare,
    measure,
    stream_logits,
    token_stream,
)
from hwlm.config import ModelConfig  # noqa: E402
from hwlm.engine_args import EngineArgs, add_cli_args, from_cli_args  # noqa: E402
from hwlm.models import CausalLM  # noqa: E402
from hwlm.models.layers import Linear  # noqa: E402
from hwlm.models.loader import load_model, resolve_model  # noqa: E402
from hwlm.models.quantization import check_quantization  # noqa: E402
from tests.tiny_models import build_tiny_model  # noqa: E402

NUM_TOKENS = 256
# (arch, method) -> (max mean KL in nats, min top-1 agreement).
BOUNDS = {
    ("llama", "int8"): (0.02, 0.7),
    ("llama", "int4"): (0.7, 0.18),
    ("opt", "int8"): (0.01, 0.8),
    ("opt", "int4"): (0.3, 0.35),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HWLM_QUANT_CACHE", str(tmp_path / "quant-cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for arch in ("llama", "opt"):
        folders[arch] = tmp_path_factory.mktemp(arch)
        build_tiny_model(arch, folders[arch])
    return folders


def _within(result: QualityResult, arch: str) -> bool:
    max_kl, min_top1 = BOUNDS[(arch, result.quantization)]
    return result.mean_kl <= max_kl and result.top1_agreement >= min_top1


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_quality_within_bounds(tiny: dict[str, Path], arch: str) -> None:
    int8, int4 = measure(str(tiny[arch]), ["int8", "int4"], NUM_TOKENS)
    for result in (int8, int4):
        assert _within(result, arch), (
            f"{arch}: {result} outside {BOUNDS[(arch, result.quantization)]}"
        )
    assert int8.mean_kl < int4.mean_kl / 5, "int8 should be far closer to float than int4"


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_model_matches_its_dequantized_weights(
    tiny: dict[str, Path], method: str
) -> None:
    """The whole quantized model against the float model run with the same weights, quantized
    then dequantized: what is left is the kernels' activation rounding (measured, KL against the
    twin: int4 0.0019, int8 0.0060; the weights' own rounding: int4 0.34, int8 0.0016; int8's
    one activation scale per call costs more than its weights' rounding)."""
    resolved = resolve_model(str(tiny["llama"]))
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    backend = CPUBackend()
    tokens = token_stream(config.vocab_size, 128)
    quantized = load_model(resolved, config, backend, torch.float32, quantization=method)
    twin = load_model(resolved, config, backend, torch.float32)
    twins = dict(twin.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, Linear) and isinstance(module.kernel, cpu_quant.ORT_LAYERS):
            twins[name].weight.data.copy_(module.kernel.dequantized_weight())
    assert isinstance(quantized.logits_kernel, cpu_quant.ORT_LAYERS)
    twin.lm_head.weight.data.copy_(quantized.logits_kernel.dequantized_weight())
    reference = stream_logits(load_model(resolved, config, backend, torch.float32), backend, tokens)
    dequantized = stream_logits(twin, backend, tokens)
    kernels_kl = compare(dequantized, stream_logits(quantized, backend, tokens))[0]
    weights_kl = compare(reference, dequantized)[0]
    assert kernels_kl < {"int4": 0.01, "int8": 0.012}[method], f"{method}: KL {kernels_kl:.4f}"
    if method == "int4":
        assert kernels_kl < weights_kl / 10, f"int4: {kernels_kl:.4f} vs {weights_kl:.4f}"


def _scaled(method: Callable[..., BlockQuantized], factor: float) -> Callable[..., BlockQuantized]:
    def broken(w: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
        q = method(w, bits, block_size)
        return BlockQuantized(q.bits, q.block_size, q.n, q.k, q.packed, q.scales * factor, None)

    return broken


def _rows_shuffled(method: Callable[..., ChannelQuantized]) -> Callable[..., ChannelQuantized]:
    def broken(w: np.ndarray) -> ChannelQuantized:
        q = method(w)
        order = np.random.default_rng(0).permutation(q.codes.shape[1])
        return ChannelQuantized(np.ascontiguousarray(q.codes[:, order]), q.scales)

    return broken


@pytest.mark.parametrize("broken", ["int4 scales x1.5", "int8 outputs permuted"])
def test_bounds_catch_broken_quantization(
    tiny: dict[str, Path], broken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if broken.startswith("int4"):
        monkeypatch.setattr(cpu_quant, "quantize_blocks", _scaled(cpu_quant.quantize_blocks, 1.5))
    else:
        monkeypatch.setattr(
            cpu_quant, "quantize_channels", _rows_shuffled(cpu_quant.quantize_channels)
        )
    [result] = measure(str(tiny["llama"]), [broken[:4]], NUM_TOKENS)
    assert not _within(result, "llama"), f"{broken} passed the bounds: {result}"


def test_llm_runs_quantized_layers(tiny: dict[str, Path]) -> None:
    llm = LLM(str(tiny["llama"]), quantization="int4", device="cpu", num_kv_blocks=16)
    out = llm.generate(["hello there"], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4
    model = llm.engine.runner.model
    assert isinstance(model, CausalLM)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.quantization == "int4" for m in linears)
    layers = [m for m in linears if m is not model.lm_head]  # the head runs as logits_kernel
    assert all(isinstance(m.kernel, cpu_quant.ORT_LAYERS) for m in layers)
    assert isinstance(model.logits_kernel, cpu_quant.ORT_LAYERS)
    assert all(m.weight.numel() == 0 for m in linears), "float weights were kept"


def test_tied_head_is_quantized_as_a_copy(tmp_path: Path) -> None:
    build_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    resolved = resolve_model(str(tmp_path / "tied"))
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    assert config.tie_word_embeddings
    backend = CPUBackend()
    model = load_model(resolved, config, backend, torch.float32, quantization="int8")
    embed = model.lm_head.weight
    assert embed.numel() == config.vocab_size * config.hidden_size, "embeddings were freed"
    assert isinstance(model.logits_kernel, cpu_quant.ORT_LAYERS)
    deq = model.logits_kernel.dequantized_weight()
    step = embed.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((deq - embed).abs() <= step / 2 + 1e-7), "the head is not the embeddings"


def test_int8_nbits_kernel_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """HWLM_CPU_INT8_KERNEL=nbits: 8-bit MatMulNBits in blocks of 32 (Q8_0's layout)."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(96, 200, generator=g) * 0.05, torch.randn(5, 200, generator=g)
    monkeypatch.setenv(cpu_quant.INT8_KERNEL_ENV, "nbits")
    kernel = cpu_quant.quantized_linear(w, None, "int8")
    assert isinstance(kernel.source, str)
    layout, _ = read_graph(onnx.load(kernel.source))
    assert isinstance(layout, BlockQuantized)
    assert (layout.bits, layout.block_size, layout.k_blocks) == (8, 32, 7)
    deq = kernel.dequantized_weight()
    step = w.abs().amax(dim=1, keepdim=True) / 127  # bounds every block's own step
    assert torch.all((deq - w).abs() <= step + 1e-7)
    want = x.double() @ deq.double().T
    assert (kernel(x).double() - want).abs().max().item() < 0.02
    monkeypatch.setenv(cpu_quant.INT8_KERNEL_ENV, "int7")
    with pytest.raises(ValueError, match="HWLM_CPU_INT8_KERNEL must be one of dynamic, nbits"):
        cpu_quant.quantized_linear(w, None, "int8")


def test_layer_calls_agree_through_onnxruntimes_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer binds through ORT's native objects where it can; with an onnxruntime that lacks
    them it falls back to the public API, with the same results (leading dims, a strided and a
    float64 input, zero rows)."""
    import onnxruntime

    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(72, 256, generator=g) * 0.05, torch.randn(72, generator=g)
    x = torch.randn(2, 3, 300, generator=g)[..., :256]  # strided rows
    native = cpu_quant.quantized_linear(w, b, "int4")
    monkeypatch.setattr(onnxruntime, "OrtDevice", object())  # no OrtDevice.make: public path
    public = cpu_quant.quantized_linear(w, b, "int4")
    for inputs in (x, x.double(), x[:0]):
        got, want = public(inputs), native(inputs)
        assert got.shape == (*inputs.shape[:-1], 72) and got.dtype == inputs.dtype
        assert torch.equal(got, want)
    deq = native.dequantized_weight().double()
    # int8 activations (accuracy_level 4) against float64 products of the same int4 weights
    assert (native(x).double() - (x.double() @ deq.T + b.double())).abs().max().item() < 0.05


def test_unsupported_backend_is_a_one_line_error() -> None:
    with pytest.raises(ValueError) as err:
        check_quantization("int4", ReferenceBackend())
    message = str(err.value)
    assert "quantization 'int4'" in message and "reference backend" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="quantization 'int8' is not supported by the reference"):
        ReferenceBackend().quantized_linear(torch.zeros(2, 2), None, "int8")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        check_quantization("int3", CPUBackend())
    with pytest.raises(ValueError, match="'fp8' is not supported by the cpu backend"):
        check_quantization("fp8", CPUBackend())
    check_quantization("int4", CPUBackend())
    check_quantization(None, ReferenceBackend())


def test_gpu_backends_quantizations() -> None:
    """cuda runs fp8 and W4A16/W8A16 (backends/cuda_quant.py); rocm none yet."""
    from hwlm.backends.cuda import CUDABackend
    from hwlm.backends.rocm import ROCmBackend

    assert set(CUDABackend.quantizations) == {"int8", "int4", "fp8"}
    assert ROCmBackend.quantizations == ()


def test_quantization_flag() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="m")
    add_cli_args(parser)
    assert from_cli_args(parser.parse_args([])).quantization is None
    assert from_cli_args(parser.parse_args(["--quantization", "int4"])).quantization == "int4"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int3"])
    assert EngineArgs(model="m", quantization="int8").quantization == "int8"


_POOL_SCRIPT = """
import sys, torch
from hwlm.backends import cpu_quant
g = torch.Generator().manual_seed(5)
w, x = torch.randn(72, 256, generator=g) * 0.05, torch.randn(3, 256, generator=g)
kernel = cpu_quant.quantized_linear(w, None, "int4")
torch.save(kernel(x), sys.argv[1])
print(cpu_quant.ort_pool(), cpu_quant._shared_pool() if cpu_quant.ort_pool() == "shared" else "-")
"""


@pytest.mark.parametrize("pool", ["session", "shared"])
def test_ort_pool_option_gives_the_same_outputs(
    pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HWLM_CPU_ORT_POOL=shared (ORT's process-wide pool, made before ORT's environment, so in a
    fresh process) computes what per-session pools compute."""
    import subprocess
    import sys

    monkeypatch.setenv(cpu_quant.POOL_ENV, pool)
    out = tmp_path / "y.pt"
    run = subprocess.run(
        [sys.executable, "-c", _POOL_SCRIPT, str(out)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ([pool, "True"] if pool == "shared" else [pool, "-"])
    monkeypatch.setenv(cpu_quant.POOL_ENV, "session")
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(72, 256, generator=g) * 0.05, torch.randn(3, 256, generator=g)
    assert torch.equal(torch.load(out), cpu_quant.quantized_linear(w, None, "int4")(x))


def test_ort_pool_option_rejects_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_quant.POOL_ENV, "global")
    with pytest.raises(ValueError, match="HWLM_CPU_ORT_POOL must be one of session, shared"):
        cpu_quant.session_options()


def test_bucket_warm_up_runs_quantized_layers(tiny: dict[str, Path]) -> None:
    """The start-up pass over every dense shape at each token bucket (backends with
    ``eager_token_buckets``, the cuda one) works on layers whose float weights were freed."""
    llm = LLM(str(tiny["llama"]), quantization="int4", device="cpu", num_kv_blocks=16)
    runner = llm.engine.runner
    calls: list[int] = []
    model = runner.model
    assert isinstance(model, CausalLM)
    layer = next(m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head)
    kernel = layer.kernel
    assert kernel is not None

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return kernel(x)

    layer.kernel = counted
    runner.token_buckets = (3, 8)
    runner._warm_up_buckets()
    assert calls == [3, 8]


def test_int4_batch_twin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``HWLM_CPU_INT4_BATCH_KERNEL=dynamic``: calls of 8 rows or more go to the int8 twin, which
    multiplies by the 4-bit weights rounded again to int8 per output channel (error bounded as
    the conformance suite bounds int8's, plus that rounding); fewer rows to MatMulNBits; the
    default is MatMulNBits alone, and a bad value is a one-line error."""
    monkeypatch.setenv("HWLM_QUANT_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g) * 0.05
    b = torch.randn(96, generator=g)
    assert isinstance(cpu_quant.quantized_linear(w, b, "int4"), cpu_quant.OrtLinear)
    monkeypatch.setenv("HWLM_CPU_INT4_BATCH_KERNEL", "dynamic")
    layer = cpu_quant.quantized_linear(w, b, "int4")
    assert isinstance(layer, cpu_quant.TwinLinear)
    for rows, inner in ((1, layer.nbits), (7, layer.nbits), (8, layer.int8), (40, layer.int8)):
        x = torch.randn(rows, 256, generator=g)
        assert torch.equal(layer(x), inner(x)), f"{rows} rows"
    deq = layer.dequantized_weight().double()
    x = torch.randn(40, 256, generator=g).double()
    error = (layer(x.float()).double() - (x @ deq.T + b.double())).abs()
    activation_step = 2 * x.abs().max() / 255  # one scale per call
    weight_step = deq.abs().amax(dim=1) / 127  # per output channel
    allowed = (
        6
        / 12**0.5
        * (activation_step * deq.norm(dim=1) + x.norm(dim=1, keepdim=True) * weight_step)
    )
    assert (error <= allowed + 1e-4).all(), f"error {(error / allowed).max():.2f}x the bound"
    monkeypatch.setenv("HWLM_CPU_INT4_BATCH_KERNEL", "fast")
    with pytest.raises(
        ValueError, match="HWLM_CPU_INT4_BATCH_KERNEL must be one of nbits, dynamic"
    ):
        cpu_quant.quantized_linear(w, b, "int4")
