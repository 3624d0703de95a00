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


# Fused residual add + RMSNorm and rotary embedding: row counts (a decode step of one sequence, a
# ragged batch, a large batch) by hidden size or head size; --quick (slow backends) skips 256 rows.
FUSED_ROWS = [1, 7, 256]
FUSED_ROWS_QUICK = [1, 7]
ROTARY_HEADS = [(14, 2), (32, 8)]  # (query heads, kv heads): Qwen2.5-0.5B's GQA, Llama-3-8B's


def _fused_rows(config: pytest.Config) -> list[int]:
    return FUSED_ROWS_QUICK if config.getoption("--quick") else FUSED_ROWS


def _rel_err(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    return ((got.cpu().double() - want).abs() / scale.clamp_min(1.0)).max().item()


@pytest.mark.parametrize("hidden", [64, 896, 1024, 4096])
def test_add_rms_norm(
    backend: Backend, norm_dtype: str, hidden: int, pytestconfig: pytest.Config
) -> None:
    skip_unless_supported(backend, norm_dtype, 16, 1, 64)
    dtype = DTYPES[norm_dtype]
    g = torch.Generator().manual_seed(hidden)
    w = torch.rand(hidden, generator=g).add(0.5).to(dtype)
    for rows in _fused_rows(pytestconfig):
        case = f"add_rms_norm-{norm_dtype}-rows{rows}-h{hidden}"
        wide = torch.randn(rows, hidden + 8, generator=g).to(dtype)
        x = wide[:, :hidden]  # rows with a stride, as a slice of a wider activation
        residual = torch.randn(rows, hidden, generator=g).mul(4).to(dtype)
        want_sum = x + residual  # torch's add: the sum rounded once to the dtype
        # Copies even on the CPU, so that the inputs kept here show what the op modified.
        dev_wide = wide.to(backend.device, copy=True)
        dev_res = residual.to(backend.device, copy=True)
        dev_x = dev_wide[:, :hidden]
        normed, new_residual = backend.add_rms_norm(dev_x, dev_res, w.to(backend.device), 1e-6)
        backend.synchronize()
        assert normed.shape == x.shape and new_residual.shape == x.shape, f"{case}: shapes"
        assert normed.dtype == dtype and new_residual.dtype == dtype, f"{case}: dtypes"
        assert torch.equal(bits(dev_wide.cpu()), bits(wide)), f"{case}: x was modified"
        got_sum = new_residual.cpu()
        assert torch.equal(bits(got_sum), bits(want_sum)), f"{case}: sum differs from torch's"
        sd = want_sum.double()
        expected = sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        assert not normed.isnan().any(), f"{case}: NaN"
        err = _rel_err(normed, expected, expected.abs())
        assert err <= NORM_TOL[norm_dtype], f"{case}: error {err:.2e}"


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_rotary(
    backend: Backend, norm_dtype: str, head_size: int, pytestconfig: pytest.Config
) -> None:
    skip_unless_supported(backend, norm_dtype, 16, 1, head_size)
    dtype, d, half = DTYPES[norm_dtype], head_size, head_size // 2
    g = torch.Generator().manual_seed(head_size)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    for (num_heads, num_kv_heads), rows in itertools.product(
        ROTARY_HEADS, _fused_rows(pytestconfig)
    ):
        case = f"rotary-{norm_dtype}-rows{rows}-d{d}-{num_heads}q{num_kv_heads}kv"
        # q and k are column slices of one qkv projection, as in the models: strided rows.
        sizes = [num_heads * d, num_kv_heads * d, num_kv_heads * d]
        qkv = torch.randn(rows, sum(sizes), generator=g).to(dtype)
        positions = torch.randint(0, 4096, (rows,), generator=g)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)  # [rows, 1, d / 2], as RotaryEmbedding
        dev_qkv = qkv.to(backend.device, copy=True)
        q, k, _ = dev_qkv.split(sizes, dim=-1)
        dev_cos, dev_sin = cos.to(backend.device), sin.to(backend.device)
        q_out, k_out = backend.rotary(
            q.view(rows, num_heads, d), k.view(rows, num_kv_heads, d), dev_cos, dev_sin
        )
        backend.synchronize()
        assert torch.equal(bits(dev_qkv.cpu()), bits(qkv)), f"{case}: q or k was modified"
        c, s = cos.double(), sin.double()
        q_in, k_in, _ = qkv.double().split(sizes, dim=-1)
        for name, got, x in (
            ("q", q_out, q_in.view(rows, num_heads, d)),
            ("k", k_out, k_in.view(rows, num_kv_heads, d)),
        ):
            assert got.shape == x.shape and got.dtype == dtype, f"{case}: {name} shape/dtype"
            assert got.is_contiguous(), f"{case}: {name} output is not contiguous"
            x1, x2 = x[..., :half], x[..., half:]
            expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
            # Each output is a difference of two rounded products: error relative to their size.
            scale = torch.cat(
                ((x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()), -1
            )
            assert not got.isnan().any(), f"{case}: {name} NaN"
            err = _rel_err(got, expected, scale)
            assert err <= NORM_TOL[norm_dtype], f"{case}: {name} error {err:.2e}"


@pytest.mark.parametrize("vocab", [1000, 4097, 151936])
def test_greedy_sample(backend: Backend, norm_dtype: str, vocab: int) -> None:
    """Argmax (ties to the lowest id, as torch) and its log-probability, against float64."""
    skip_unless_supported(backend, norm_dtype, 16, 1, 64)
    dtype = DTYPES[norm_dtype]
    g = torch.Generator().manual_seed(vocab)
    rows = 5
    logits = torch.randn(rows, vocab, generator=g).mul(3).to(dtype)
    peak = logits.max().item() + 1
    logits[1, 7] = logits[1, vocab - 3] = peak  # a tie across the row: the lower id wins
    logits[2, vocab - 1] = peak  # the last column (a partial tile in a blocked kernel)
    logits[3] = 0.0  # all equal
    tokens, logprobs = backend.greedy_sample(logits.to(backend.device))
    backend.synchronize()
    exact = logits.double()
    want = exact.argmax(dim=-1)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert tokens.cpu().tolist() == want.tolist()
    want_lp = exact.gather(1, want[:, None])[:, 0] - exact.logsumexp(dim=-1)
    assert torch.allclose(logprobs.cpu().double(), want_lp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("vocab", [1000, 4097, 151936])
def test_masked_greedy_sample(backend: Backend, norm_dtype: str, vocab: int) -> None:
    """Argmax over the tokens a packed grammar mask allows, and its log-probability under the
    unmasked softmax, against float64; ids past the mask's words are forbidden."""
    skip_unless_supported(backend, norm_dtype, 16, 1, 64)
    dtype = DTYPES[norm_dtype]
    g = torch.Generator().manual_seed(vocab + 1)
    rows = 6
    logits = torch.randn(rows, vocab, generator=g).mul(3).to(dtype)
    allowed = torch.rand(rows, vocab, generator=g) < 0.3
    peak = logits.max().item() + 1
    logits[0, 5] = peak  # the row's maximum is forbidden: the allowed maximum wins
    allowed[0, 5] = False
    allowed[1] = False
    allowed[1, [9, vocab - 2]] = True
    logits[1, 9] = logits[1, vocab - 2] = peak  # a tie of two allowed ids: the lower wins
    allowed[2] = False
    allowed[2, vocab - 1] = True  # only the last column (a partial tile in a blocked kernel)
    allowed[3] = True  # all allowed: plain greedy
    allowed[4] = False  # nothing allowed: token 0, as torch's argmax of a row of -inf
    words_per_row = (vocab + 31) // 32 - 1  # one word short: the last ids are forbidden
    padded = torch.zeros(rows, 32 * (words_per_row + 1), dtype=torch.bool)
    padded[:, :vocab] = allowed
    bits = padded.view(rows, -1, 32).long() << torch.arange(32)
    words = bits.sum(-1).to(torch.int64).add(2**31).remainder(2**32).sub(2**31).to(torch.int32)
    words = words[:, :words_per_row]
    allowed[:, 32 * words_per_row :] = False
    allowed[5] = allowed[5] | (torch.arange(vocab) < 32 * words_per_row)
    words[5] = -1  # every bit set
    tokens, logprobs = backend.masked_greedy_sample(
        logits.to(backend.device), words.to(backend.device)
    )
    backend.synchronize()
    exact = logits.double()
    want = exact.masked_fill(~allowed, float("-inf")).argmax(dim=-1)
    want[4] = 0
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert tokens.cpu().tolist() == want.tolist()
    want_lp = exact.gather(1, want[:, None])[:, 0] - exact.logsumexp(dim=-1)
    assert torch.allclose(logprobs.cpu().double(), want_lp, atol=1e-4, rtol=1e-5)
