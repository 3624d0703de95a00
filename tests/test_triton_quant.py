"""The cuda backend's quantized dense layers (backends/cuda_quant.py): the W4A16 Triton kernels
(``hwlm.kernels.triton.w4a16``), the per-token fp8 activation kernel (``fp8_quant``) and the
wiring, on tiny shapes under Triton's CPU interpreter (TRITON_INTERPRET=1, set below).
``TRITON_INTERPRET=0 pytest tests/test_triton_quant.py`` runs the same checks compiled on a GPU.

Each kernel path is forced with an explicit ``Launch`` (GEMV, tensor-core tiles, split-K, one
scale per tile or per word) and checked against a float64 product with the weights that
``dequantize_reference`` unpacks in torch, or, for checkpoint layouts, with the neutral
``GroupQuantizedWeight.dequantize``, so a packing error cannot cancel out.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed; the cuda kernels need it")

from hwlm.backends import cuda_quant  # noqa: E402
from hwlm.backends.cuda_quant import (  # noqa: E402
    Fp8Linear,
    W4A16Linear,
    prequantized_linear,
    quantize_groups,
)
from hwlm.kernels.triton import fp8_quant  # noqa: E402
from hwlm.kernels.triton.w4a16 import (  # noqa: E402
    ROW_WORDS,
    Launch,
    PackedWeight,
    dequantize,
    dequantize_reference,
    pack_codes,
    unpack_codes,
    w4a16_linear,
)
from hwlm.models.quantized_weight import Fp8Weight, GroupQuantizedWeight  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")
DEVICE = torch.device("cuda" if not INTERPRET and torch.cuda.is_available() else "cpu")
if not INTERPRET and DEVICE.type == "cpu":
    pytest.skip("TRITON_INTERPRET=0 needs a GPU", allow_module_level=True)

# Forced launches: (name, Launch). block_k 128 holds one group of 128 (one scale per tile);
# group 32 makes the kernels read one scale per word instead.
LAUNCHES = {
    "gemv": Launch(1, 16, 128, 1, 4),
    "gemv-split3": Launch(1, 16, 128, 3, 4),
    "gemm": Launch(16, 32, 128, 1, 4),
    "gemm-split2": Launch(16, 32, 128, 2, 4),
}


def _bound(x: torch.Tensor, deq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Allowed |error| per output: fp32 sums (1e-5 of sum |x||w|), or for half types the
    weights' and outputs' rounding to 8 bits (2**-7 of sum |x||w|). A wrong code order or
    scale gives errors of the order of |y|, about sqrt(K) times larger."""
    rel = 1e-5 if dtype == torch.float32 else 2**-7
    return rel * (x.abs().double() @ deq.abs().T) + 1e-6


def _group_weight(
    n: int, k: int, bits: int, group: int, zeros: bool, seed: int
) -> GroupQuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = k // group
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).to(torch.float16)
    zp = torch.randint(0, 1 << bits, (n, groups), generator=g, dtype=torch.uint8) if zeros else None
    return GroupQuantizedWeight(bits, group, codes, scales, zp)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_codes_layout(bits: int) -> None:
    """Code k of a row sits in word k // per_word at bit (k % per_word) * bits; K is padded."""
    per_word = 32 // bits
    codes = torch.randint(0, 1 << bits, (3, 2 * per_word + 3), dtype=torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, ROW_WORDS)
    assert not words[:, 3:].any(), "padding words must be zero"
    for k in (0, 1, per_word - 1, per_word, 2 * per_word + 2):
        got = (words[:, k // per_word] >> ((k % per_word) * bits)) & ((1 << bits) - 1)
        assert torch.equal(got, codes[:, k].to(torch.int32)), f"code {k}"
    assert torch.equal(unpack_codes(words, bits, codes.shape[1]), codes)


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize(
    ("bits", "group", "zeros"), [(4, 128, False), (4, 32, True), (8, 128, True)]
)
def test_w4a16_kernels(launch: str, bits: int, group: int, zeros: bool) -> None:
    rows = 3 if launch.startswith("gemv") else 19
    n, k = 40, 384  # 40: a partial block of outputs; 384: three tiles of 128
    weight = _group_weight(n, k, bits, group, zeros, seed=bits + group)
    packed = cuda_quant.pack_group_quantized(weight, DEVICE)
    deq = weight.dequantize().double()
    assert torch.equal(dequantize_reference(packed).cpu().double(), deq)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    y = w4a16_linear(x.to(DEVICE), packed, bias.to(DEVICE), 4, launch=LAUNCHES[launch]).cpu()
    expected = x.double() @ deq.T + bias.double()
    excess = ((y.double() - expected).abs() / _bound(x, deq, torch.float32)).max().item()
    assert excess <= 1.0, f"{launch}: error {excess:.2f}x the bound"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 18, 70])
def test_w4a16_half_types(dtype: torch.dtype, rows: int) -> None:
    """The chosen launch (GEMV, tiles, and the dequantize-then-matmul path from 64 rows here) on
    half-precision activations, K off the group size."""
    n, k = 48, 200
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(rows)) * 0.05
    layer = W4A16Linear(quantize_groups(w.to(DEVICE), 4, 128), None, num_sms=4)
    layer.dequant_min_rows = 64
    x = torch.randn(rows, k).to(dtype)
    y = layer(x.to(DEVICE)).cpu()
    assert y.dtype == dtype and y.shape == (rows, n)
    deq = layer.dequantized_weight().cpu().double()
    expected = x.double() @ deq.T
    excess = ((y.double() - expected).abs() / _bound(x, deq, dtype)).max().item()
    assert excess <= 1.0, f"rows {rows}: error {excess:.2f}x the bound"


def test_dequantize_kernel_matches_reference() -> None:
    weight = _group_weight(24, 96, 4, 32, True, seed=5)
    packed = cuda_quant.pack_group_quantized(weight, DEVICE)
    got = dequantize(packed, torch.float32).cpu()
    assert torch.equal(got, weight.dequantize())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_groups_round_to_nearest(bits: int) -> None:
    """Every weight within half a step of its code, except where the top code clips it (the
    largest magnitude maps to the most negative code, so the other side can reach one step
    beyond the top code: a whole step off, plus what rounding the scale to float16 adds over
    ``half`` steps, up to 2**-11 relative); every group uses code 0. The seed gives an 8-bit
    weight 1.008 steps off (a bound of exactly one step failed on it)."""
    w = torch.randn(16, 300, generator=torch.Generator().manual_seed(263)) * 0.05
    packed = quantize_groups(w, bits, 128)
    assert packed.scales.shape == (16, 3) and packed.scales.dtype == torch.float16
    deq = dequantize_reference(packed)
    step = packed.scales.float().abs().repeat_interleave(128, dim=1)[:, :300]
    codes = unpack_codes(packed.words, bits, 300)
    top = codes == (1 << bits) - 1
    err = (deq - w).abs()
    assert (err[~top] <= step[~top] * (0.5 + 1e-3)).all()
    half = 1 << (bits - 1)
    assert (err[top] <= step[top] * (1 + half * 2**-11 + 1e-3)).all()
    for g in range(3):
        assert (codes[:, 128 * g : 128 * (g + 1)].min(1).values == 0).all(), f"group {g}"


def test_prequantized_group_weight_any_layout() -> None:
    """A checkpoint's 4-bit weight with zero points in groups of 32 (as GGUF Q4_0 / GPTQ) through
    the W4A16 kernel, against its own dequantization."""
    weight = _group_weight(32, 256, 4, 32, True, seed=7)
    layer = prequantized_linear(weight, None, DEVICE, num_sms=4)
    assert isinstance(layer, W4A16Linear)
    x = torch.randn(2, 256)
    deq = weight.dequantize().double()
    y = layer(x.to(DEVICE)).cpu().double()
    excess = ((y - x.double() @ deq.T).abs() / _bound(x, deq, torch.float32)).max().item()
    assert excess <= 1.0, f"error {excess:.2f}x the bound"


def test_fp8_row_quantization_rounds_like_torch() -> None:
    """The kernel's scales and codes equal torch's cast of the same scaled values (round to
    nearest even, including carries into the exponent and subnormals); padding columns are
    zero; an all-zero row gets a finite scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1500, generator=g) * torch.tensor([1.0, 100.0, 1e-3, 0.0, 7.0])[:, None]
    x[4, :8] = torch.tensor([124.4, -31.7, 0.01, 2**-12, 1e-9, 3.0, -0.0, 448.0])
    q, scale = fp8_quant.quantize_rows(x.to(DEVICE), k_out=1520)
    q, scale = q.cpu(), scale.cpu()
    ref_q, ref_scale = fp8_quant.quantize_rows_torch(x)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q[:, :1500].float(), ref_q.float())  # values: -0.0 may come back as 0.0
    assert not q[:, 1500:].float().any()
    assert torch.isfinite(scale).all() and scale[3].item() > 0


def _needs_rowwise_scaled_mm() -> None:
    """Skip where ``torch._scaled_mm`` on DEVICE refuses per-row scales: the CPU build of torch
    2.11 (used by the interpreter runs on the GPU machine) takes per-tensor scales only; 2.13
    and every CUDA build take both."""
    a = torch.ones(16, 16, device=DEVICE).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(
            a,
            a.t(),
            scale_a=torch.ones(16, 1, device=DEVICE),
            scale_b=torch.ones(1, 16, device=DEVICE),
            out_dtype=torch.bfloat16,
        )
    except RuntimeError as exc:
        pytest.skip(f"torch {torch.__version__} _scaled_mm on {DEVICE}: {str(exc)[:80]}")


@pytest.mark.parametrize(("rows", "n", "k", "bias"), [(1, 64, 256, False), (5, 40, 200, True)])
def test_fp8_linear_against_its_quantized_activations(
    rows: int, n: int, k: int, bias: bool
) -> None:
    """The fp8 layer (``_scaled_mm``, with K and N padded to 16 where needed) against a float64
    product of the same fp8 activations and weights: only the fp32 sums and the bfloat16 output
    rounding differ."""
    _needs_rowwise_scaled_mm()
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    layer = cuda_quant.quantized_linear(w.to(DEVICE), None if b is None else b.to(DEVICE), "fp8", 4)
    assert isinstance(layer, Fp8Linear)
    y = layer(x.to(DEVICE)).cpu().double()
    xq, xs = fp8_quant.quantize_rows_torch(x)
    x_deq = xq.double() * xs.double()
    deq = layer.dequantized_weight().cpu().double()
    product = x_deq @ deq.T
    expected = product + (0 if b is None else b.double())
    # bfloat16 output: at most half an ulp (2**-9 relative) of the sum, and of the product too
    # where the bias is added after it is rounded; 2**-8 of |product| + |bias| covers both.
    magnitude = product.abs() + (0 if b is None else b.double().abs())
    bound = 2**-8 * magnitude + 1e-5 * (x_deq.abs() @ deq.abs().T) + 1e-6
    excess = ((y - expected).abs() / bound).max().item()
    assert excess <= 1.0, f"error {excess:.2f}x the bound"


def test_prequantized_fp8_per_tensor_scale() -> None:
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(32, 64, generator=g) * 50).to(torch.float8_e4m3fn)
    stored = Fp8Weight(weight, torch.tensor(0.01))
    layer = prequantized_linear(stored, None, DEVICE, num_sms=4)
    assert isinstance(layer, Fp8Linear)
    assert torch.equal(layer.dequantized_weight().cpu(), stored.dequantize())


def test_unknown_method_is_one_line_error() -> None:
    from hwlm.backends.cuda import CUDABackend

    assert CUDABackend.quantizations == cuda_quant.METHODS
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        cuda_quant.quantized_linear(torch.zeros(16, 16), None, "int3", 4)


def test_odd_group_falls_back_to_dequantized() -> None:
    weight = _group_weight(8, 36, 4, 12, False, seed=1)  # 12: not a multiple of 8 codes
    layer = prequantized_linear(weight, None, DEVICE, num_sms=4)
    assert not isinstance(layer, W4A16Linear)
    assert torch.equal(layer.dequantized_weight().cpu(), weight.dequantize())


def test_packed_weight_shapes() -> None:
    packed = quantize_groups(torch.randn(10, 72), 4, 128)
    assert isinstance(packed, PackedWeight)
    assert packed.words.shape == (10, ROW_WORDS) and packed.num_groups == 1


@pytest.mark.skipif(not INTERPRET, reason="the model runs on the triton-interpret backend")
def test_int4_model_matches_its_dequantized_twin(tmp_path: Path) -> None:
    """A tiny Qwen2 (fused qkv with bias, gate/up, untied LM head) with int4 weights on
    triton-interpret, against the float model run with the same weights dequantized: W4A16
    keeps the activations, so only float32 summation order differs, and every greedy choice of
    the stream agrees."""
    from hwlm.backends.triton_interpret import TritonInterpreterBackend
    from hwlm.bench.quality import stream_logits, token_stream
    from hwlm.config import ModelConfig
    from hwlm.models.layers import Linear
    from hwlm.models.loader import load_model, resolve_model
    from tests.tiny_models import build_tiny_model

    build_tiny_model("qwen2", tmp_path)
    resolved = resolve_model(str(tmp_path))
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    backend = TritonInterpreterBackend()
    quantized = load_model(resolved, config, backend, torch.float32, quantization="int4")
    twin = load_model(resolved, config, backend, torch.float32)
    twins = dict(twin.named_modules())
    count = 0
    for name, module in quantized.named_modules():
        if isinstance(module, Linear) and isinstance(module.kernel, W4A16Linear):
            twins[name].weight.data.copy_(module.kernel.dequantized_weight())
            count += 1
    assert count == 4 * config.num_layers, f"{count} W4A16 layers"
    assert isinstance(quantized.logits_kernel, W4A16Linear)
    twin.lm_head.weight.data.copy_(quantized.logits_kernel.dequantized_weight())
    tokens = token_stream(config.vocab_size, 12)
    got = stream_logits(quantized, backend, tokens)
    expected = stream_logits(twin, backend, tokens)
    assert (got - expected).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def _shape_only(n: int, k: int) -> PackedWeight:
    words = torch.empty(n, k // 8, dtype=torch.int32)
    return PackedWeight(4, 128, n, k, words, torch.empty(n, k // 128, dtype=torch.float16), None)


def test_gemv_launch_choice_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama-3-8B's decode shapes on an H200 (132 SMs) take the sweep's best launch (128
    outputs, one group a tile, K split 8 ways); a layer with a short K is not split and narrows
    its blocks instead; HWLM_W4A16_GEMV overrides, and a malformed one is an error."""
    from hwlm.kernels.triton.w4a16 import GEMV_ENV, choose_launch

    monkeypatch.delenv(GEMV_ENV, raising=False)
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        launch = choose_launch(_shape_only(n, k), 1, 132)
        assert launch == Launch(1, 128, 128, 8, 4, 3), (n, k, launch)
    short = choose_launch(_shape_only(896, 896), 1, 132)
    assert short.split_k == 1 and short.block_n == 16, short
    assert choose_launch(_shape_only(256, 8192), 1, 132).split_k > 1
    monkeypatch.setenv(GEMV_ENV, "8,256,2,2")
    assert choose_launch(_shape_only(256, 8192), 1, 132) == Launch(1, 8, 256, 2, 2)
    monkeypatch.setenv(GEMV_ENV, "8,x")
    with pytest.raises(ValueError, match=f"{GEMV_ENV} must be"):
        choose_launch(_shape_only(256, 8192), 1, 132)
