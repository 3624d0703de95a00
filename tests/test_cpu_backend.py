"""The CPU backend's numba kernels against the float64 torch reference."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hwlm.attention import AttentionMetadata
from hwlm.backends.cpu import CPUBackend
from hwlm.kernels import reference

# Max abs error against float64, for outputs of order one (convex combinations of N(0, 1)).
ATOL = 1e-5
NUM_KV_HEADS = 2
# (query_len, seq_len): pure prefill, chunked prefill over a cached prefix, decode; lengths cross
# the kernel's key tiles (32) and query chunks (16).
MIXED = [(37, 37), (13, 50), (1, 29), (1, 1), (40, 70), (1, 64)]


@pytest.fixture(scope="module")
def backend() -> CPUBackend:
    return CPUBackend()


def sentinel(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A finite, distinctive fill for memory that must not be read or written."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g).mul(2000.0).sub(1000.0)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def paged_batch(seqs, block_size, num_heads, head_size, seed=0, q_scale=1.0):
    """Query, a sentinel-filled cache whose blocks are a shuffled subset of a larger pool holding
    each sequence's context, and the metadata."""
    g = torch.Generator().manual_seed(seed)
    need = [(seq_len + block_size - 1) // block_size for _, seq_len in seqs]
    pool = 2 * sum(need) + 5
    physical = torch.randperm(pool, generator=g)
    cache = sentinel((2, pool, block_size, NUM_KV_HEADS, head_size), seed + 1)
    rows = cache.view(2, -1, NUM_KV_HEADS, head_size)
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    start = 0
    for i, ((_, seq_len), n) in enumerate(zip(seqs, need, strict=True)):
        tables[i, :n] = physical[start : start + n].int()
        start += n
        pos = torch.arange(seq_len)
        slots = tables[i].long()[pos // block_size] * block_size + pos % block_size
        rows[:, slots] = torch.randn(2, seq_len, NUM_KV_HEADS, head_size, generator=g)
    q_lens = [q for q, _ in seqs]
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()]).int(),
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64),  # unused here
        max_query_len=max(q_lens),
        max_seq_len=max(s for _, s in seqs),
    )
    query = torch.randn(sum(q_lens), num_heads, head_size, generator=g) * q_scale
    return query, cache, metadata


@pytest.mark.parametrize("head_size", [32, 64, 80])
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16, 12])
def test_attention_matches_reference(backend, block_size, gqa, head_size):
    query, cache, metadata = paged_batch(MIXED, block_size, NUM_KV_HEADS * gqa, head_size)
    before = cache.clone()
    scale = head_size**-0.5
    out = backend.attention(query, cache, metadata, scale)
    expected = reference.paged_attention(query, cache, metadata, scale, torch.float64)
    assert out.shape == query.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)
    assert torch.equal(bits(cache), bits(before))


def test_attention_large_scores_no_nan(backend):
    # Scores in the hundreds: a softmax without a running max overflows to inf and NaN.
    query, cache, metadata = paged_batch(MIXED, 16, 8, 64, seed=3, q_scale=200.0)
    out = backend.attention(query, cache, metadata, 64**-0.5)
    assert not out.isnan().any()
    expected = reference.paged_attention(query, cache, metadata, 64**-0.5, torch.float64)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=0)


def test_attention_strided_query_and_empty_batch(backend):
    query, cache, metadata = paged_batch(MIXED, 16, 4, 64, seed=4)
    wide = torch.zeros(query.shape[0], 4, 2 * 64)
    wide[:, :, 64:] = query
    out = backend.attention(wide[:, :, 64:], cache, metadata, 0.125)
    torch.testing.assert_close(out, backend.attention(query, cache, metadata, 0.125))
    empty = AttentionMetadata(
        torch.zeros(1, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0, 1, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int64),
        0,
        0,
    )
    assert backend.attention(query[:0], cache, empty, 0.125).shape == (0, 4, 64)


def test_attention_rejects_block_outside_cache(backend):
    query, cache, metadata = paged_batch(MIXED, 16, 4, 64)
    metadata.block_tables[0, 0] = cache.shape[1]
    with pytest.raises(ValueError, match="outside the cache"):
        backend.attention(query, cache, metadata, 0.125)


def test_attention_from_threads(backend):
    query, cache, metadata = paged_batch(MIXED, 16, 4, 64)
    expected = backend.attention(query, cache, metadata, 0.125)
    same = []

    def call():
        for _ in range(20):
            same.append(torch.equal(backend.attention(query, cache, metadata, 0.125), expected))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same == [True] * 60


FRESH_PROCESS = """
import importlib.util, numba, torch
torch.set_num_threads(1)
from hwlm.backends.cpu import CPUBackend
from tests.test_cpu_backend import MIXED, paged_batch
query, cache, metadata = paged_batch(MIXED, 16, 4, 64)
CPUBackend().attention(query, cache, metadata, 0.125)
omp = importlib.util.find_spec("numba.np.ufunc.omppool") is not None
print(numba.threading_layer(), omp, torch.get_num_threads())
"""


def test_threading_layer_in_fresh_process():
    """numba runs on OpenMP (torch's pool) where it can, and leaves torch's thread count alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    layer, omp_available, torch_threads = done.stdout.split()
    assert layer == "omp" or omp_available == "False"
    assert torch_threads == "1"


@pytest.mark.parametrize("block_size", [1, 16, 12])
def test_write_kv_touches_only_its_slots(backend, block_size):
    g = torch.Generator().manual_seed(block_size)
    num_blocks, head_size, num_tokens = 24, 80, 17
    [cache] = backend.allocate_kv_cache(
        1, num_blocks, block_size, NUM_KV_HEADS, head_size, torch.float32
    )
    cache.copy_(sentinel(tuple(cache.shape), 11))
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[[2, 9]] = -1
    # Key and value as strided views of one projection output, as a model produces them.
    kv = torch.randn(num_tokens, 2, NUM_KV_HEADS, head_size, generator=g)
    key, value = kv[:, 0], kv[:, 1]
    expected = cache.clone()
    rows = expected.view(2, -1, NUM_KV_HEADS, head_size)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            rows[0, slot], rows[1, slot] = key[t], value[t]
    backend.write_kv(key, value, cache, slots)
    assert torch.equal(bits(cache), bits(expected))


def test_write_kv_all_skipped_and_out_of_range(backend):
    [cache] = backend.allocate_kv_cache(1, 3, 4, NUM_KV_HEADS, 32, torch.float32)
    cache.copy_(sentinel(tuple(cache.shape), 12))
    before = cache.clone()
    key = torch.randn(2, NUM_KV_HEADS, 32)
    backend.write_kv(key, key, cache, torch.tensor([-1, -1]))
    assert torch.equal(bits(cache), bits(before))
    with pytest.raises(ValueError, match="outside the cache"):
        backend.write_kv(key, key, cache, torch.tensor([0, 12]))


@pytest.mark.parametrize("pairs", [[(1, 6), (3, 0), (5, 2)], [(1, 2), (2, 4)]])
def test_copy_blocks(backend, pairs):
    caches = backend.allocate_kv_cache(3, 8, 4, NUM_KV_HEADS, 32, torch.float32)
    for i, cache in enumerate(caches):
        cache.copy_(sentinel(tuple(cache.shape), 20 + i))
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected, pairs)
    backend.copy_blocks(caches, pairs)
    for got, want in zip(caches, expected, strict=True):
        assert torch.equal(bits(got), bits(want))


def test_probe_and_memory_budget(backend, monkeypatch):
    probe = CPUBackend.probe()
    assert probe.available and probe.score == 10 and "cores" in probe.reason
    monkeypatch.setenv("HWLM_CPU_KVCACHE_SPACE", "100000")  # no cap: the utilisation decides
    small, large = backend.memory_budget(0.2), backend.memory_budget(0.8)
    assert 0 < small < large
    assert large == pytest.approx(4 * small, rel=0.05)  # MemAvailable may move a little
    monkeypatch.setenv("HWLM_CPU_KVCACHE_SPACE", "0.5")
    assert backend.memory_budget(0.8) == min(large, 2**29)


def _tiny_llama(tie: bool) -> Any:
    from hwlm.config import ModelConfig
    from hwlm.models import build_model

    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 97,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
    }
    model = build_model(ModelConfig.from_hf_dict(hf), CPUBackend(), torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_prepare_model_packs_every_dense_layer_and_keeps_the_products(tie):
    from hwlm.models.layers import Linear

    model = _tiny_llama(tie)
    linears = [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]
    inputs = [torch.randn(7, m.weight.shape[1]) for m in linears]
    want = [F.linear(x, m.weight, m.bias) for x, m in zip(inputs, linears, strict=True)]
    x = torch.randn(7, 32)
    want_logits = model.compute_logits(x)
    CPUBackend().prepare_model(model)
    assert all(m.kernel is not None for m in linears) and model.logits_kernel is not None
    for m, x_m, expected in zip(linears, inputs, want, strict=True):
        assert m.weight.numel() == 0  # the packed copy replaced it
        torch.testing.assert_close(m(x_m), expected)
    torch.testing.assert_close(model.compute_logits(x), want_logits)
    if tie:  # the embedding still needs its table
        assert model.lm_head.weight.numel() == 97 * 32


def test_onednn_can_be_switched_off(monkeypatch):
    from hwlm.backends import cpu_linear

    cpu_linear.onednn_usable.cache_clear()
    monkeypatch.setenv("HWLM_CPU_ONEDNN", "0")
    model = _tiny_llama(False)
    CPUBackend().prepare_model(model)
    assert model.logits_kernel is None
    assert all(getattr(m, "kernel", None) is None for m in model.modules())
    cpu_linear.onednn_usable.cache_clear()


def test_packed_linear_rounds_rows_up_and_returns_only_the_real_ones():
    from hwlm.backends.cpu_linear import PackedLinear, bucket_rows

    assert [bucket_rows(m) for m in (1, 16, 17, 33, 4803)] == [1, 16, 18, 36, 5120]
    assert all(m <= bucket_rows(m) <= 1.125 * m + 1 for m in range(1, 5000))
    assert len({bucket_rows(m) for m in range(1, 8193)}) < 100  # a bounded set of shapes
    weight, bias = torch.randn(24, 40), torch.randn(24)
    layer = PackedLinear(weight, bias)
    for shape in [(17, 40), (3, 11, 40)]:  # 17 and 33 rows: both padded inside
        x = torch.randn(*shape)
        got = layer(x)
        assert got.shape == (*shape[:-1], 24)
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


_ATTENTION = sys.modules.get("hwlm.kernels.numba.paged_attention")
_FUSED_THRESHOLDS = [
    ("hwlm.kernels.numba.paged_attention", "SERIAL_MAX_PRODUCTS"),
    ("hwlm.kernels.numba.paged_attention", "SERIAL_MAX_ELEMENTS"),
    ("hwlm.kernels.numba.fused", "SERIAL_MAX_ELEMENTS"),
    ("hwlm.kernels.numba.greedy", "SERIAL_MAX_ELEMENTS"),
]


@pytest.fixture(params=["serial", "parallel"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every numba op forced onto its serial or its parallel build, whatever the input size."""
    import importlib

    for module, name in _FUSED_THRESHOLDS:
        value = 1 << 62 if request.param == "serial" else 0
        monkeypatch.setattr(importlib.import_module(module), name, value)
    return str(request.param)


def test_both_kernel_builds_match_the_reference(backend, kernel_path):
    g = torch.Generator().manual_seed(11)
    query, cache, metadata = paged_batch(MIXED, 16, 6, 64, seed=5)
    out = backend.attention(query, cache, metadata, 0.125)
    expected = reference.paged_attention(query, cache, metadata, 0.125, torch.float64)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)
    keys = torch.randn(5, NUM_KV_HEADS, 64, generator=g)
    slots = torch.tensor([3, -1, 0, 17, 9])
    cache = torch.zeros(2, 4, 8, NUM_KV_HEADS, 64)
    backend.write_kv(keys, -keys, cache, slots)
    rows = cache.view(2, -1, NUM_KV_HEADS, 64)
    assert torch.equal(rows[0, slots[slots >= 0]], keys[slots >= 0])
    assert torch.equal(rows[1, slots[slots >= 0]], -keys[slots >= 0])
    x, residual = (torch.randn(7, 96, generator=g) for _ in range(2))
    w = torch.rand(96, generator=g) + 0.5
    want_sum = x + residual
    normed, total = backend.add_rms_norm(x, residual.clone(), w, 1e-6)
    assert torch.equal(total, want_sum)
    want = want_sum.double() * torch.rsqrt(want_sum.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(normed.double(), want * w.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        backend.rms_norm(x, w, 1e-6).double(), reference_rms(x, w), atol=1e-5, rtol=1e-5
    )
    gate_up = torch.randn(7, 2 * 80, generator=g)
    torch.testing.assert_close(
        backend.silu_and_mul(gate_up), F.silu(gate_up[:, :80]) * gate_up[:, 80:], atol=1e-5, rtol=0
    )
    qkv = torch.randn(7, (4 + 2) * 32, generator=g)
    q, k = qkv[:, :128].view(7, 4, 32), qkv[:, 128:].view(7, 2, 32)  # strided, as in the models
    cos, sin = torch.randn(7, 1, 16, generator=g), torch.randn(7, 1, 16, generator=g)
    got_q, got_k = backend.rotary(q, k, cos, sin)
    from hwlm.models.rotary import apply_rotary

    torch.testing.assert_close(got_q, apply_rotary(q, cos, sin), atol=1e-6, rtol=0)
    torch.testing.assert_close(got_k, apply_rotary(k, cos, sin), atol=1e-6, rtol=0)


def reference_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()


def test_greedy_sample_edge_rows(backend, kernel_path):
    """Masked (-inf) logits are sampled around; rows with NaN or +inf get torch's answer."""
    from hwlm.sampling.sampler import greedy_in_torch

    g = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 3000, generator=g) * 4
    logits[0, ::2] = float("-inf")  # a structured-output mask
    logits[1, :2999] = float("-inf")  # one token allowed
    want_tokens, want_lp = greedy_in_torch(logits)
    tokens, logprobs = backend.greedy_sample(logits)
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(logprobs, want_lp, atol=1e-4, rtol=1e-5)
    assert logprobs[1].item() == 0.0 and tokens[1].item() == 2999
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[2, 5] = bad
        tokens, logprobs = backend.greedy_sample(broken)
        want_tokens, want_lp = greedy_in_torch(broken)
        assert tokens.tolist() == want_tokens.tolist()
        torch.testing.assert_close(logprobs, want_lp, equal_nan=True)
