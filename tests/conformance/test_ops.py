"""The op-level conformance suite: every backend, the same cases, each against float64 torch.

Run: ``pytest tests/conformance --device cpu`` (or cuda, rocm, a plugin name, auto).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hwlm.backend import Backend
from hwlm.kernels import reference
from tests.conformance.cases import (
    ATTENTION_TOL,
    BATCHES,
    DTYPES,
    NORM_TOL,
    NUM_KV_HEADS,
    AttentionCase,
    build_paged_batch,
    sentinel_like,
    unsupported_reason,
)

FULL = dict(
    dtype=list(DTYPES),
    block_size=[1, 12, 16, 32],
    gqa=[1, 2, 7, 8],
    head_size=[64, 80, 96, 128, 256],
)
QUICK = dict(dtype=["float32", "float16"], block_size=[16], gqa=[1, 7], head_size=[64])


def _grid(quick: bool) -> dict[str, list]:
    return QUICK if quick else FULL


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    grid = _grid(bool(metafunc.config.getoption("--quick")))
    if "attention_case" in metafunc.fixturenames:
        cases = [
            AttentionCase(b, dt, bs, g, d)
            for b, dt, bs, g, d in itertools.product(
                BATCHES, grid["dtype"], grid["block_size"], grid["gqa"], grid["head_size"]
            )
        ]
        metafunc.parametrize("attention_case", cases, ids=[c.id for c in cases])
    if "cache_case" in metafunc.fixturenames:
        cases = list(itertools.product(grid["dtype"], grid["block_size"], grid["head_size"]))
        metafunc.parametrize("cache_case", cases, ids=[f"{dt}-bs{bs}-d{d}" for dt, bs, d in cases])
    if "norm_dtype" in metafunc.fixturenames:
        metafunc.parametrize("norm_dtype", grid["dtype"])


def skip_unless_supported(
    backend: Backend, dtype: str, block_size: int, gqa: int, head_size: int
) -> None:
    reason = unsupported_reason(backend, dtype, block_size, gqa, head_size)
    if reason:
        pytest.skip(f"{backend.name}: {reason}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """A view of the raw bits, so that comparisons are exact (and -0.0 != 0.0)."""
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def test_attention(backend: Backend, attention_case: AttentionCase) -> None:
    case = attention_case
    skip_unless_supported(backend, case.dtype, case.block_size, case.gqa, case.head_size)
    batch = build_paged_batch(backend, case)
    before = batch.cache.clone()
    scale = case.head_size**-0.5
    out = backend.attention(batch.query, batch.cache, batch.metadata, scale)
    backend.synchronize()
    expected = reference.paged_attention(
        batch.query.cpu().double(),
        batch.cache.cpu().double(),
        batch.metadata.to(torch.device("cpu")),
        scale,
        compute_dtype=torch.float64,
    )
    assert out.shape == batch.query.shape, f"{case.id}: output shape {tuple(out.shape)}"
    assert out.dtype == batch.query.dtype, f"{case.id}: output dtype {out.dtype}"
    got = out.cpu().double()
    assert not got.isnan().any(), f"{case.id}: NaN in the output"
    err = (got - expected).abs().max().item()
    assert err <= ATTENTION_TOL[case.dtype], (
        f"{case.id}: max error {err:.2e} > {ATTENTION_TOL[case.dtype]}"
    )
    assert torch.equal(bits(batch.cache), bits(before)), (
        f"{case.id}: attention modified the KV cache"
    )


def test_write_kv(backend: Backend, cache_case: tuple[str, int, int]) -> None:
    dtype_name, block_size, head_size = cache_case
    skip_unless_supported(backend, dtype_name, block_size, 1, head_size)
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(7)
    pool = 9
    num_slots = pool * block_size
    [cache] = backend.allocate_kv_cache(1, pool, block_size, NUM_KV_HEADS, head_size, dtype)
    cache.copy_(sentinel_like(tuple(cache.shape), dtype, 3).to(cache.device))
    num_tokens = min(13, num_slots - 2)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]
    slots[1] = -1  # a padding token: writes nothing
    key = torch.randn(num_tokens, NUM_KV_HEADS, head_size, generator=g).to(dtype)
    value = torch.randn(num_tokens, NUM_KV_HEADS, head_size, generator=g).to(dtype)
    expected = cache.cpu().clone()
    reference.write_kv(key, value, expected, slots)
    device = backend.device
    backend.write_kv(key.to(device), value.to(device), cache, slots.to(device))
    backend.synchronize()
    case = f"write_kv-{dtype_name}-bs{block_size}-d{head_size}"
    assert torch.equal(bits(cache.cpu()), bits(expected)), f"{case}: wrong slots written"


def test_copy_blocks(backend: Backend, cache_case: tuple[str, int, int]) -> None:
    dtype_name, block_size, head_size = cache_case
    skip_unless_supported(backend, dtype_name, block_size, 1, head_size)
    dtype = DTYPES[dtype_name]
    caches = backend.allocate_kv_cache(2, 8, block_size, NUM_KV_HEADS, head_size, dtype)
    for i, cache in enumerate(caches):
        cache.copy_(sentinel_like(tuple(cache.shape), dtype, 10 + i).to(cache.device))
    expected = [c.cpu().clone() for c in caches]
    pairs = [(1, 6), (3, 0), (5, 2)]
    reference.copy_blocks(expected, pairs)
    backend.copy_blocks(caches, pairs)
    backend.synchronize()
    case = f"copy_blocks-{dtype_name}-bs{block_size}-d{head_size}"
    for layer, (got, want) in enumerate(zip(caches, expected, strict=True)):
        assert torch.equal(bits(got.cpu()), bits(want)), f"{case}: layer {layer} differs"


def test_rms_norm(backend: Backend, norm_dtype: str) -> None:
    skip_unless_supported(backend, norm_dtype, 16, 1, 64)
    dtype = DTYPES[norm_dtype]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 768, generator=g).to(dtype)
    w = torch.rand(768, generator=g).add(0.5).to(dtype)
    out = backend.rms_norm(x.to(backend.device), w.to(backend.device), 1e-6).cpu().double()
    xd = x.double()
    expected = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert not out.isnan().any(), f"rms_norm-{norm_dtype}: NaN"
    err = ((out - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
    assert err <= NORM_TOL[norm_dtype], f"rms_norm-{norm_dtype}: error {err:.2e}"


def test_silu_and_mul(backend: Backend, norm_dtype: str) -> None:
    skip_unless_supported(backend, norm_dtype, 16, 1, 64)
    dtype = DTYPES[norm_dtype]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(29, 2 * 512, generator=g).to(dtype)
    out = backend.silu_and_mul(x.to(backend.device)).cpu().double()
    gate, up = x.double().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert not out.isnan().any(), f"silu_and_mul-{norm_dtype}: NaN"
    err = ((out - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
    assert err <= NORM_TOL[norm_dtype], f"silu_and_mul-{norm_dtype}: error {err:.2e}"
