"""Conformance of the quantized dense layer (``Backend.quantized_linear``) of each backend.

Each case checks the kernel alone: its output against a float64 product with the SAME weights,
quantized and dequantized (``dequantized_weight()``), so that weight rounding, which the quality
tests bound, is no part of the error. What is left is the kernel's own rounding of the
activations (int8 on the cpu backend, per row and block or per call; fp8 per row on cuda) and of
the float sums.

Tolerances, per output ``(m, n)``:

- ``int8`` / ``int4``: ``TOL_SIGMAS * (step / sqrt(12)) * ||W_n||_2 + 1e-4``, with
  ``step = 2 * max|x| / 255``: int8 rounding of the activations with the coarsest scale any of
  the kernels uses (one per call), treated as independent uniform errors, allowed six standard
  deviations. Correct kernels measured at most 0.7 of it; a wrong layout (nibble order, rows
  swapped) measured about 100 times it, scales 10% off about 6 times. The GPU's W4A16 kernels
  keep the activations as they are (fp32 sums only): under 0.01 of it, and 6-9 times it with
  scales 10% off.
- ``fp8``: each activation rounded to float8_e4m3 (3 mantissa bits: a relative error of at most
  2**-4, standard deviation at most 2**-4 / sqrt(3), below 2**-6 of the row's scale an absolute
  one of at most 2**-10 of it), independent per element, so
  ``sigma**2 = (2**-8 / 3) * sum_k (x_k W_nk)**2 + (2**-20 / 3) * s_m**2 * ||W_n||**2`` with
  ``s_m = max|x_m| / 448``; allowed ``TOL_SIGMAS * sigma``, plus ``2**-8 |y|`` for the bfloat16
  output and 1e-4. Measured on triton-interpret (the cuda code on the CPU): correct kernels at
  most 0.55 of it, outputs 10% too large 1.5-1.9 times it, outputs permuted 20-39 times it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hwlm.backend import Backend
from hwlm.engine_args import QUANTIZATIONS

TOL_SIGMAS = 6.0


@dataclass(frozen=True)
class QuantCase:
    method: str
    rows: int
    in_features: int
    out_features: int
    bias: bool

    @property
    def id(self) -> str:
        b = "-bias" if self.bias else ""
        return f"{self.method}-m{self.rows}-k{self.in_features}-n{self.out_features}{b}"


# (rows, in, out, bias): one decode row, a batch with K off the block size, C1's down_proj in a
# prefill, a Qwen2-style qkv with bias; --quick keeps the first two.
SHAPES = [(1, 768, 1280, False), (7, 200, 64, True), (65, 2048, 768, False), (16, 896, 1152, True)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "quant_case" in metafunc.fixturenames:
        shapes = SHAPES[:2] if metafunc.config.getoption("--quick") else SHAPES
        cases = [QuantCase(m, *shape) for m in QUANTIZATIONS for shape in shapes]
        metafunc.parametrize("quant_case", cases, ids=[c.id for c in cases])


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HWLM_QUANT_CACHE", str(tmp_path_factory.getbasetemp() / "quant-cache"))


def test_quantized_linear(backend: Backend, quant_case: QuantCase) -> None:
    case = quant_case
    if case.method not in backend.quantizations:
        runs = ", ".join(backend.quantizations) or "none"
        pytest.skip(f"{backend.name}: runs quantizations: {runs}")
    g = torch.Generator().manual_seed(case.rows * 1000 + case.in_features)
    w = torch.randn(case.out_features, case.in_features, generator=g) * 0.05
    b = torch.randn(case.out_features, generator=g) if case.bias else None
    x = torch.randn(case.rows, case.in_features, generator=g)
    kernel = backend.quantized_linear(w.to(backend.device), _to(b, backend), case.method)
    out = kernel(x.to(backend.device))
    backend.synchronize()
    assert out.shape == (case.rows, case.out_features), f"{case.id}: shape {tuple(out.shape)}"
    deq = kernel.dequantized_weight().cpu().double()
    assert deq.shape == w.shape, f"{case.id}: dequantized shape {tuple(deq.shape)}"
    expected = x.double() @ deq.T + (0 if b is None else b.double())
    got = out.cpu().double()
    assert not got.isnan().any(), f"{case.id}: NaN in the output"
    excess = ((got - expected).abs() / tolerance(case.method, x.double(), deq)).max().item()
    assert excess <= 1.0, f"{case.id}: error {excess:.2f}x the tolerance"


def tolerance(method: str, x: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    """The allowed |error| [rows, out] of ``method`` for float64 ``x`` [rows, in] and the
    dequantized weights ``deq`` [out, in] (module docstring)."""
    if method == "fp8":
        scale = x.abs().amax(1, keepdim=True) / 448
        variance = (2**-8 / 3) * (x**2 @ (deq**2).T) + (2**-20 / 3) * scale**2 * (deq**2).sum(1)
        return TOL_SIGMAS * variance.sqrt() + 2**-8 * (x @ deq.T).abs() + 1e-4
    step = 2 * x.abs().max() / 255
    return (TOL_SIGMAS * step / 12**0.5 * deq.norm(dim=1) + 1e-4).expand(x.shape[0], -1)


def _to(t: torch.Tensor | None, backend: Backend) -> torch.Tensor | None:
    return None if t is None else t.to(backend.device)
