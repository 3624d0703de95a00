"""Conformance of the dense layer for weights a checkpoint stored quantized
(``Backend.prequantized_linear``: AWQ, GPTQ, GGUF Q4_0/Q8_0, fp8 checkpoints).

Each case builds a ``GroupQuantizedWeight`` or ``Fp8Weight`` from known codes and checks the
backend's kernel against a float64 product with ``weight.dequantize()``: the codes are exact, so
the only error allowed is the kernel's rounding of the activations.

Tolerance, per output ``n``: ``TOL_SIGMAS * (step / sqrt(12)) * ||W_n||_2 + 1e-4``, as in
``test_quantized_linear``: ``step = 2 * max|x| / 255`` (int8 activations with one scale per call,
the coarsest any kernel uses); for fp8 weights ``step = max|x| / 8`` (e4m3 keeps 3 mantissa bits:
at most 1/16 relative error, a step of 1/8 of the value). A kernel that read the codes in the
wrong nibble order, ignored zero points or mixed up groups fails by orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hwlm.backend import Backend
from hwlm.models.quantized_weight import Fp8Weight, GroupQuantizedWeight, PrequantizedWeight

TOL_SIGMAS = 6.0


@dataclass(frozen=True)
class PrequantCase:
    kind: str  # "int4", "int8" (GroupQuantizedWeight) or "fp8" (Fp8Weight)
    group_size: int  # inputs per scale; 0 for fp8: per channel, -1: per tensor
    zeros: bool  # explicit zero points (AWQ/GPTQ) or the symmetric default (GGUF)
    rows: int
    in_features: int
    out_features: int
    bias: bool

    @property
    def id(self) -> str:
        group = {0: "channel", -1: "tensor"}.get(self.group_size, f"g{self.group_size}")
        z = "-zeros" if self.zeros else ""
        b = "-bias" if self.bias else ""
        return f"{self.kind}-{group}{z}-m{self.rows}-k{self.in_features}-n{self.out_features}{b}"


CASES = [
    PrequantCase("int4", 32, True, 1, 256, 96, False),  # AWQ/GPTQ-like, one decode row
    PrequantCase("int4", 128, True, 7, 512, 64, True),  # group 128 with a Qwen2-style bias
    PrequantCase("int4", 64, True, 5, 192, 48, False),  # an odd number of groups per row
    PrequantCase("int4", 32, False, 9, 128, 80, False),  # GGUF Q4_0: symmetric zero point 8
    PrequantCase("int8", 32, False, 16, 256, 64, True),  # GGUF Q8_0: symmetric zero point 128
    PrequantCase("int8", 64, True, 3, 128, 32, False),  # GPTQ 8-bit
    PrequantCase("int4", 48, True, 4, 96, 40, False),  # a group size no kernel takes as it is
    PrequantCase("fp8", 0, False, 6, 256, 72, True),  # per-channel scales
    PrequantCase("fp8", -1, False, 2, 128, 64, False),  # one scale per tensor
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "prequant_case" in metafunc.fixturenames:
        cases = CASES[:2] + CASES[-2:-1] if metafunc.config.getoption("--quick") else CASES
        metafunc.parametrize("prequant_case", cases, ids=[c.id for c in cases])


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HWLM_QUANT_CACHE", str(tmp_path_factory.getbasetemp() / "quant-cache"))


def make_weight(case: PrequantCase, gen: torch.Generator) -> PrequantizedWeight:
    n, k = case.out_features, case.in_features
    if case.kind == "fp8":
        values = torch.randn(n, k, generator=gen) * 100
        weight = values.clamp(-448, 448).to(torch.float8_e4m3fn)
        count = 1 if case.group_size == -1 else n
        scale = torch.rand(count, generator=gen) * 1e-3 + 2e-4
        return Fp8Weight(weight, scale.reshape(()) if count == 1 else scale)
    bits = int(case.kind[3:])
    groups = k // case.group_size
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005) * 16 / (1 << bits)
    zeros = None
    if case.zeros:
        zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.uint8)
    weight = GroupQuantizedWeight(bits, case.group_size, codes, scales.half().float(), zeros)
    weight.check()
    return weight


def test_prequantized_linear(backend: Backend, prequant_case: PrequantCase) -> None:
    case = prequant_case
    g = torch.Generator().manual_seed(case.rows * 1000 + case.in_features + case.out_features)
    weight = make_weight(case, g)
    b = torch.randn(case.out_features, generator=g) if case.bias else None
    x = torch.randn(case.rows, case.in_features, generator=g)
    kernel = backend.prequantized_linear(weight, None if b is None else b.to(backend.device))
    out = kernel(x.to(backend.device))
    backend.synchronize()
    assert out.shape == (case.rows, case.out_features), f"{case.id}: shape {tuple(out.shape)}"
    deq = weight.dequantize(torch.float64)
    expected = x.double() @ deq.T + (0 if b is None else b.double())
    got = out.cpu().double()
    assert not got.isnan().any(), f"{case.id}: NaN in the output"
    levels = 8 if case.kind == "fp8" else 255 / 2
    step = x.abs().max().double() / levels
    tol = TOL_SIGMAS * step / 12**0.5 * deq.norm(dim=1) + 1e-4
    excess = ((got - expected).abs() / tol).max().item()
    assert excess <= 1.0, f"{case.id}: error {excess:.2f}x the tolerance"
