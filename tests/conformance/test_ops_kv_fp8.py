"""Conformance of the fp8 KV cache (``kv_cache_dtype="fp8"``: float8_e4m3fn, per-tensor scales).

Scales are not 1.0 here (keys 0.37, values 1.9), so that a kernel that forgets one, or applies it
the wrong way round, fails; vLLM's default of 1.0 is the easy case of the same code.

- ``write_kv``: bit for bit against ``hwlm.kernels.reference.write_kv``: ``k / k_scale`` in
  float32 (correctly rounded), saturated to +-448 and rounded to the nearest e4m3 value, is one
  exact function of the input, so any difference is a bug. Some inputs exceed 448 * scale to
  check the saturation; untouched slots keep their sentinels.
- attention, two references:
  - tight: float64 attention over the SAME fp8 cache (``fp8 * scale``), within the tolerance of
    the query's dtype (``ATTENTION_TOL``): reading e4m3 and upcasting it is exact, so what is
    left is the kernel's own rounding, as for a cache of the query's dtype;
  - loose: float64 attention over the keys and values before fp8 rounding, within
    ``FP8_REL_TOL`` of each output's size: the cost of the fp8 cache itself (see there).
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
    NUM_KV_HEADS,
    AttentionCase,
    build_paged_batch,
    fp8_sentinel_like,
    unsupported_reason,
)

K_SCALE, V_SCALE = 0.37, 1.9
# Against the unquantized cache, each output o = sum_i p_i v_i may differ by
# FP8_REL_TOL * (sum_i p_i |v_i| + FP8_FLOOR). Why: e4m3 keeps 3 mantissa bits, so rounding V
# moves o by at most 2^-4 (6.25%) of sum p|v| (a short context's output is one value, and keeps
# that whole error; long ones average it down); values below e4m3's subnormals (2^-9 * scale)
# flush towards 0, an absolute error of up to ~0.002 here, which FP8_FLOOR covers ten times.
# Rounding K moves each score by a few percent of itself and so the weights p. The worst output
# over the float32 grid (head sizes 64-256, scales 0.37/1.9 and 1/1) measured 0.105 of the
# bound's base; 0.2 leaves margin, and a forgotten v_scale (an error of 0.9 of it) or k_scale
# still fails.
FP8_REL_TOL = 0.2
FP8_FLOOR = 0.02

FULL = dict(
    dtype=list(DTYPES),
    block_size=[1, 16],
    gqa=[1, 2, 7],  # MHA; Qwen3-0.6B (G2); Qwen2.5-0.5B, a group padded to 8
    head_size=[64, 96, 128],
)
QUICK = dict(dtype=["bfloat16"], block_size=[16], gqa=[7], head_size=[64])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    grid = QUICK if metafunc.config.getoption("--quick") else FULL
    if "fp8_attention_case" in metafunc.fixturenames:
        cases = [
            AttentionCase(b, dt, bs, g, d, kv_cache_dtype="fp8")
            for b, dt, bs, g, d in itertools.product(
                BATCHES, grid["dtype"], grid["block_size"], grid["gqa"], grid["head_size"]
            )
        ]
        metafunc.parametrize("fp8_attention_case", cases, ids=[c.id for c in cases])
    if "fp8_cache_case" in metafunc.fixturenames:
        dtypes = list(DTYPES)  # cheap cases: every input dtype even in --quick
        cases = list(itertools.product(dtypes, grid["block_size"], grid["head_size"]))
        ids = [f"{dt}-bs{bs}-d{d}-kvfp8" for dt, bs, d in cases]
        metafunc.parametrize("fp8_cache_case", cases, ids=ids)


def skip_unless_fp8(
    backend: Backend, dtype: str, block_size: int, gqa: int, head_size: int
) -> None:
    reason = unsupported_reason(backend, dtype, block_size, gqa, head_size, kv_cache_dtype="fp8")
    if reason:
        pytest.skip(f"{backend.name}: {reason}")


def _scales(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([K_SCALE], dtype=torch.float32, device=device),
        torch.tensor([V_SCALE], dtype=torch.float32, device=device),
    )


def test_write_kv_fp8(backend: Backend, fp8_cache_case: tuple[str, int, int]) -> None:
    dtype_name, block_size, head_size = fp8_cache_case
    skip_unless_fp8(backend, dtype_name, block_size, 1, head_size)
    case = f"write_kv-{dtype_name}-bs{block_size}-d{head_size}-kvfp8"
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(11)
    pool = 9
    num_slots = pool * block_size
    [cache] = backend.allocate_kv_cache(
        1, pool, block_size, NUM_KV_HEADS, head_size, torch.float8_e4m3fn
    )
    assert cache.dtype == torch.float8_e4m3fn, f"{case}: allocated {cache.dtype}"
    cache.copy_(fp8_sentinel_like(tuple(cache.shape), 3).to(cache.device))
    num_tokens = min(13, num_slots - 2)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]
    slots[1] = -1  # a padding token: writes nothing
    key = torch.randn(num_tokens, NUM_KV_HEADS, head_size, generator=g).mul(4)
    value = torch.randn(num_tokens, NUM_KV_HEADS, head_size, generator=g)
    key[0, 0, :4] = torch.tensor([200.0, -200.0, 1e4, -1e4])  # past 448 * K_SCALE: saturate
    key, value = key.to(dtype), value.to(dtype)
    k_scale, v_scale = _scales(torch.device("cpu"))
    expected = cache.cpu().clone()
    reference.write_kv(key, value, expected, slots, k_scale, v_scale)
    device = backend.device
    dev_k, dev_v = _scales(device)
    backend.write_kv(key.to(device), value.to(device), cache, slots.to(device), dev_k, dev_v)
    backend.synchronize()
    got = cache.cpu()
    assert not got.float().isnan().any(), f"{case}: NaN stored"
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (
        f"{case}: {int((got.view(torch.uint8) != expected.view(torch.uint8)).sum())} bytes differ "
        "from the reference"
    )


def test_attention_fp8(backend: Backend, fp8_attention_case: AttentionCase) -> None:
    case = fp8_attention_case
    skip_unless_fp8(backend, case.dtype, case.block_size, case.gqa, case.head_size)
    batch = build_paged_batch(backend, case, kv_scales=(K_SCALE, V_SCALE))
    assert batch.k_scale is not None and batch.v_scale is not None
    assert batch.unquantized is not None
    before = batch.cache.clone()
    scale = case.head_size**-0.5
    out = backend.attention(
        batch.query, batch.cache, batch.metadata, scale, batch.k_scale, batch.v_scale
    )
    backend.synchronize()
    assert out.shape == batch.query.shape, f"{case.id}: output shape {tuple(out.shape)}"
    assert out.dtype == batch.query.dtype, f"{case.id}: output dtype {out.dtype}"
    got = out.cpu().double()
    assert not got.isnan().any(), f"{case.id}: NaN in the output"
    query = batch.query.cpu().double()
    metadata = batch.metadata.to(torch.device("cpu"))
    same_cache = reference.paged_attention(
        query,
        batch.cache.cpu(),
        metadata,
        scale,
        torch.float64,
        batch.k_scale.cpu(),
        batch.v_scale.cpu(),
    )
    err = (got - same_cache).abs().max().item()
    tol = ATTENTION_TOL[case.dtype]
    assert err <= tol, f"{case.id}: max error {err:.2e} > {tol} against the same fp8 cache"
    unquantized = reference.paged_attention(
        query, batch.unquantized, metadata, scale, torch.float64
    )
    abs_values = batch.unquantized.clone()
    abs_values[1].abs_()
    size = reference.paged_attention(query, abs_values, metadata, scale, torch.float64)  # p|v|
    excess = ((got - unquantized).abs() / (FP8_REL_TOL * (size + FP8_FLOOR))).max().item()
    assert excess <= 1.0, (
        f"{case.id}: error {excess:.2f}x the fp8 tolerance against the unquantized cache"
    )
    assert torch.equal(batch.cache.view(torch.uint8), before.view(torch.uint8)), (
        f"{case.id}: attention modified the KV cache"
    )


def test_copy_blocks_fp8(backend: Backend, fp8_cache_case: tuple[str, int, int]) -> None:
    """Copy-on-write of fp8 blocks: bytes copied exactly, other blocks untouched."""
    dtype_name, block_size, head_size = fp8_cache_case
    skip_unless_fp8(backend, dtype_name, block_size, 1, head_size)
    caches = backend.allocate_kv_cache(
        2, 8, block_size, NUM_KV_HEADS, head_size, torch.float8_e4m3fn
    )
    for i, cache in enumerate(caches):
        cache.copy_(fp8_sentinel_like(tuple(cache.shape), 10 + i).to(cache.device))
    expected = [c.cpu().clone() for c in caches]
    pairs = [(1, 6), (3, 0), (5, 2)]
    reference.copy_blocks(expected, pairs)
    backend.copy_blocks(caches, pairs)
    backend.synchronize()
    case = f"copy_blocks-{dtype_name}-bs{block_size}-d{head_size}-kvfp8"
    for layer, (got, want) in enumerate(zip(caches, expected, strict=True)):
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), (
            f"{case}: layer {layer} differs"
        )
