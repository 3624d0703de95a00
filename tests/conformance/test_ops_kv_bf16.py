"""Conformance of the bfloat16 KV cache of a float32 model (``kv_cache_dtype="bfloat16"``).

- ``write_kv``: bit for bit against ``hwlm.kernels.reference.write_kv`` (float32 keys and values
  rounded to the nearest bfloat16, ties to even, as torch rounds); untouched slots keep their
  sentinels, and strided keys (a slice of a wider activation) are read in place.
- attention: float32 queries over the bfloat16 cache, against float64 attention over the SAME
  cache within the float32 tolerance: widening bfloat16 to float32 is exact, so what is left is
  the kernel's own rounding. (What the bfloat16 cache costs against float32 keys is a property
  of the format, bounded end to end in tests/test_kv_cache_bf16.py.)
- ``copy_blocks`` moves bfloat16 blocks unchanged.
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
    NUM_KV_HEADS,
    AttentionCase,
    build_paged_batch,
    sentinel_like,
    unsupported_reason,
)

FULL = dict(block_size=[1, 16], gqa=[1, 2, 7], head_size=[64, 96, 128])
QUICK = dict(block_size=[16], gqa=[7], head_size=[64])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bf16_kv_case" not in metafunc.fixturenames:
        return
    grid = QUICK if metafunc.config.getoption("--quick") else FULL
    if metafunc.function.__name__ == "test_attention_bf16_kv":
        cases = [
            AttentionCase(b, "float32", bs, g, d, kv_cache_dtype="bfloat16")
            for b, bs, g, d in itertools.product(
                BATCHES, grid["block_size"], grid["gqa"], grid["head_size"]
            )
        ]
    else:
        cases = [
            AttentionCase("decode", "float32", bs, 1, d, kv_cache_dtype="bfloat16")
            for bs, d in itertools.product(grid["block_size"], grid["head_size"])
        ]
    metafunc.parametrize("bf16_kv_case", cases, ids=[c.id for c in cases])


def skip_unless_bf16_kv(backend: Backend, case: AttentionCase) -> None:
    reason = unsupported_reason(
        backend, case.dtype, case.block_size, case.gqa, case.head_size, kv_cache_dtype="bfloat16"
    )
    if reason:
        pytest.skip(f"{backend.name}: {reason}")


def test_write_kv_bf16_kv(backend: Backend, bf16_kv_case: AttentionCase) -> None:
    case = bf16_kv_case
    skip_unless_bf16_kv(backend, case)
    g = torch.Generator().manual_seed(21)
    pool, d = 9, case.head_size
    [cache] = backend.allocate_kv_cache(1, pool, case.block_size, NUM_KV_HEADS, d, torch.bfloat16)
    assert cache.dtype == torch.bfloat16, f"{case.id}: allocated {cache.dtype}"
    cache.copy_(sentinel_like(tuple(cache.shape), torch.bfloat16, 5).to(cache.device))
    num_tokens = min(13, pool * case.block_size - 2)
    slots = torch.randperm(pool * case.block_size, generator=g)[:num_tokens]
    slots[1] = -1  # a padding token: writes nothing
    wide = torch.randn(num_tokens, NUM_KV_HEADS, 2 * d, generator=g).mul(3)
    key = wide[..., d:]  # strided rows, as a slice of a qkv projection
    value = torch.randn(num_tokens, NUM_KV_HEADS, d, generator=g)
    key[0, 0, :3] = torch.tensor([1.00390625, -1.01171875, 3e38])  # ties to even; near max
    expected = cache.cpu().clone()
    reference.write_kv(key, value, expected, slots)
    device = backend.device
    backend.write_kv(key.to(device), value.to(device), cache, slots.to(device))
    backend.synchronize()
    got = cache.cpu().view(torch.int16)
    differ = int((got != expected.view(torch.int16)).sum())
    assert differ == 0, f"{case.id}: {differ} elements differ from the reference"


def test_attention_bf16_kv(backend: Backend, bf16_kv_case: AttentionCase) -> None:
    case = bf16_kv_case
    skip_unless_bf16_kv(backend, case)
    batch = build_paged_batch(
        backend, AttentionCase(case.batch, "float32", case.block_size, case.gqa, case.head_size)
    )
    cache = batch.cache.to(torch.bfloat16)
    before = cache.clone()
    scale = case.head_size**-0.5
    out = backend.attention(batch.query, cache, batch.metadata, scale)
    backend.synchronize()
    assert out.shape == batch.query.shape and out.dtype == torch.float32, f"{case.id}: shape/dtype"
    expected = reference.paged_attention(
        batch.query.cpu(),
        cache.cpu(),
        batch.metadata.to(torch.device("cpu")),
        scale,
        torch.float64,
    )
    err = (out.cpu().double() - expected).abs().max().item()
    assert err <= ATTENTION_TOL["float32"], f"{case.id}: error {err:.2e}"
    assert torch.equal(cache.view(torch.int16), before.view(torch.int16)), f"{case.id}: wrote"


def test_copy_blocks_bf16_kv(backend: Backend, bf16_kv_case: AttentionCase) -> None:
    case = bf16_kv_case
    skip_unless_bf16_kv(backend, case)
    caches = backend.allocate_kv_cache(
        2, 6, case.block_size, NUM_KV_HEADS, case.head_size, torch.bfloat16
    )
    for i, cache in enumerate(caches):
        cache.copy_(sentinel_like(tuple(cache.shape), torch.bfloat16, 30 + i).to(cache.device))
    expected = [c.cpu().clone() for c in caches]
    reference.copy_blocks(expected, [(0, 3), (4, 1)])
    backend.copy_blocks(caches, [(0, 3), (4, 1)])
    backend.synchronize()
    for got, want in zip(caches, expected, strict=True):
        assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16)), case.id
