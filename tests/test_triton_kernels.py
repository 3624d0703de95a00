"""Triton kernels (hwlm.kernels.triton) against the pure-torch float64 reference, plus the cuda
and rocm backends' GPU-free parts (probe, check).

Runs on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set below before triton is
imported), so shapes are tiny. On a GPU machine, ``TRITON_INTERPRET=0 pytest
tests/test_triton_kernels.py`` runs the same checks on compiled kernels.

Launch parameters under test: ``choose_launch`` (documented, with the H100 sweep behind it, in
``hwlm.kernels.triton.paged_attention``) picks 16-row tiles of 64 keys for decode-only batches
and 64 x 64 otherwise, 4 warps (8 for 128-row tiles, halved for 64-wide AMD wavefronts),
2 pipeline stages, and split-KV only for decode-only batches with few sequences and long
contexts. Explicit ``AttentionLaunch`` values below cover key tiles smaller
and larger than a page and split-KV on mixed batches.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed; the cuda/rocm kernels need it")

from hwlm.attention import AttentionMetadata  # noqa: E402
from hwlm.backends.cuda import CUDABackend, _nvidia_gpus  # noqa: E402
from hwlm.backends.rocm import ROCmBackend, _amd_gpu_names  # noqa: E402
from hwlm.config import EngineConfig, ModelConfig  # noqa: E402
from hwlm.kernels import reference  # noqa: E402
from hwlm.kernels import triton as tk  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")
DEVICE = torch.device("cuda" if not INTERPRET and torch.cuda.is_available() else "cpu")
if not INTERPRET and DEVICE.type == "cpu":
    pytest.skip("TRITON_INTERPRET=0 needs a GPU", allow_module_level=True)

# (atol, rtol) against the float64 reference; V is N(0,1), so outputs are O(1). Half types round
# the softmax weights before the PV product and the output once more (the interpreter truncates
# to bfloat16 rather than rounding: up to 2**-7 relative).
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.5e-2, 1.6e-2),
}

# (seq_len, query_len): a full prefill, a chunk over a cached prefix (its first query at
# position 30, just below a 32-key tile edge), decodes, an idle sequence.
MIXED = [(37, 37), (40, 10), (23, 1), (17, 0), (33, 1)]
DECODE = [(70, 1), (5, 1), (129, 1)]


def make_batch(
    specs: list[tuple[int, int]],
    *,
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_size: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Query, cache and metadata; each sequence's blocks are shuffled, unused slots are NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in specs]
    num_blocks = sum(blocks_per_seq) + 3
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_size), float("nan"))
    tables = torch.zeros(len(specs), max(blocks_per_seq), dtype=torch.int32)
    slots = []
    for i, ((seq_len, q_len), n) in enumerate(zip(specs, blocks_per_seq, strict=True)):
        tables[i, :n] = torch.tensor(physical[:n], dtype=torch.int32)
        physical = physical[n:]
        pos = torch.arange(seq_len)
        blocks, offsets = tables[i].long()[pos // block_size], pos % block_size
        cache[:, blocks, offsets] = torch.randn(2, seq_len, num_kv_heads, head_size, generator=gen)
        slots.append(blocks[seq_len - q_len :] * block_size + offsets[seq_len - q_len :])
    q_lens = torch.tensor([q for _, q in specs])
    num_tokens = int(q_lens.sum())
    # Scaled up so that softmax is peaked and a wrong max or mask shows.
    query = 2 * torch.randn(num_tokens, num_kv_heads * group, head_size, generator=gen)
    metadata = AttentionMetadata(
        query_start_loc=torch.cat([torch.zeros(1), q_lens.cumsum(0)]).to(torch.int32),
        seq_lens=torch.tensor([s for s, _ in specs], dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.cat(slots).to(torch.int64),
        max_query_len=int(q_lens.max()),
        max_seq_len=max(s for s, _ in specs),
    )
    return query.to(DEVICE, dtype), cache.to(DEVICE, dtype), metadata.to(DEVICE)


def check_attention(query, cache, metadata, *, launch=None) -> None:
    scale = query.shape[-1] ** -0.5
    out = tk.paged_attention(query, cache, metadata, scale, launch=launch)
    expected = reference.paged_attention(query, cache, metadata, scale, torch.float64)
    assert out.dtype == query.dtype and out.shape == query.shape
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    atol, rtol = TOLERANCE[query.dtype]
    err = (out.double() - expected).abs()
    worst = (err / (atol + rtol * expected.abs())).max().item()
    print(f"error/tolerance {worst:.3g}")
    assert worst <= 1, f"max abs error {err.max().item():.3g} exceeds atol {atol}, rtol {rtol}"


@pytest.mark.parametrize("head_size", [64, 80])
@pytest.mark.parametrize("group", [1, 2, 4, 7])
@pytest.mark.parametrize("block_size", [16, 32])
def test_attention_float32(block_size: int, group: int, head_size: int) -> None:
    q, cache, md = make_batch(
        MIXED, block_size=block_size, num_kv_heads=2, group=group, head_size=head_size,
        dtype=torch.float32, seed=group * head_size + block_size,
    )  # fmt: skip
    check_attention(q, cache, md)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("block_size", "group", "head_size"), [(16, 4, 64), (32, 2, 80), (16, 7, 96)]
)
def test_attention_half(dtype: torch.dtype, block_size: int, group: int, head_size: int) -> None:
    q, cache, md = make_batch(
        MIXED, block_size=block_size, num_kv_heads=2, group=group, head_size=head_size,
        dtype=dtype, seed=group + head_size,
    )  # fmt: skip
    check_attention(q, cache, md)


@pytest.mark.parametrize(
    "launch",
    [
        tk.AttentionLaunch(block_m=16, block_n=16),  # key tile of half a 32-slot page
        tk.AttentionLaunch(block_m=32, block_n=64),  # key tile of two pages
        tk.AttentionLaunch(block_m=16, block_n=16, num_splits=3),  # split-KV on a mixed batch
        tk.AttentionLaunch(block_m=64, block_n=32, num_splits=8),  # splits past short contexts
    ],
    ids=["n16", "n64", "split3", "split8"],
)
def test_attention_launch_variants(launch: tk.AttentionLaunch) -> None:
    q, cache, md = make_batch(
        MIXED, block_size=32, num_kv_heads=1, group=4, head_size=64, dtype=torch.float32
    )
    check_attention(q, cache, md, launch=launch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_split_kv_decode(dtype: torch.dtype) -> None:
    q, cache, md = make_batch(
        DECODE, block_size=16, num_kv_heads=2, group=2, head_size=80, dtype=dtype
    )
    launch = tk.choose_launch(
        num_seqs=3, num_kv_heads=2, group=2, head_size=80, max_query_len=1,
        max_seq_len=md.max_seq_len, num_sms=132,
    )  # fmt: skip
    assert launch.num_splits == 1  # too short for the heuristic: force splits of 32 keys
    check_attention(q, cache, md, launch=tk.AttentionLaunch(16, 32, num_splits=5))


def test_choose_launch() -> None:
    decode = dict(num_seqs=4, num_kv_heads=8, group=4, head_size=128)
    decode["max_query_len"] = 1
    long_decode = tk.choose_launch(**decode, max_seq_len=8192)
    assert long_decode.block_m == 16 and long_decode.num_splits > 1
    assert tk.choose_launch(**decode, max_seq_len=300).num_splits == 1
    many = tk.choose_launch(**{**decode, "num_seqs": 256}, max_seq_len=8192)
    assert many.num_splits == 1  # enough programs already
    prefill = {**decode, "max_query_len": 512}
    launch = tk.choose_launch(**prefill, max_seq_len=8192)
    assert (launch.block_m, launch.block_n, launch.num_splits, launch.num_warps) == (64, 64, 1, 4)
    amd = tk.choose_launch(**prefill, max_seq_len=8192, warp_size=64)
    assert amd.num_warps == 2  # the same 128 threads in 64-wide wavefronts
    short = tk.choose_launch(**{**prefill, "max_query_len": 3}, max_seq_len=64)
    assert short.block_m == 16  # no taller than 3 tokens x 4 heads needs
    assert tk.choose_launch(**{**prefill, "head_size": 256}, max_seq_len=64).block_n == 32
    big_group = tk.choose_launch(**{**decode, "group": 32}, max_seq_len=64)
    assert big_group.block_m == 32  # a program holds one token's whole group
    huge_group = tk.choose_launch(**{**prefill, "group": 128}, max_seq_len=64)
    assert (huge_group.block_m, huge_group.num_warps) == (128, 8)


def test_attention_non_contiguous_query() -> None:
    q, cache, md = make_batch(
        MIXED, block_size=16, num_kv_heads=2, group=2, head_size=64, dtype=torch.float32
    )
    qkv = torch.cat([q.flatten(1), torch.randn(q.shape[0], 2 * 2 * 64, device=DEVICE)], dim=1)
    view = qkv[:, : q[0].numel()].view(q.shape)  # as a fused qkv projection hands it over
    assert not view.is_contiguous()
    check_attention(view, cache, md)


def test_attention_reads_no_device_value_on_host(monkeypatch: pytest.MonkeyPatch) -> None:
    if INTERPRET:
        pytest.skip("the interpreter itself copies tensors to the host")
    q, cache, md = make_batch(
        MIXED, block_size=16, num_kv_heads=2, group=2, head_size=64, dtype=torch.float16
    )
    torch.cuda.synchronize()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside paged_attention")

    for name in ("item", "tolist", "cpu", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    tk.paged_attention(q, cache, md, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("block_size", "num_kv_heads", "head_size"), [(16, 2, 64), (32, 3, 80)])
def test_write_kv(dtype: torch.dtype, block_size: int, num_kv_heads: int, head_size: int) -> None:
    num_blocks, num_tokens = 5, 11
    gen = torch.Generator().manual_seed(block_size + head_size)
    elem = torch.empty((), dtype=dtype).element_size()
    bits = {2: torch.int16, 4: torch.int32}[elem]
    # Random bit patterns (NaN encodings included) that a stray write would almost surely change.
    half = 2 ** (8 * elem - 1)
    shape = (2, num_blocks, block_size, num_kv_heads, head_size)
    sentinel = torch.randint(-half, half, shape, dtype=bits, generator=gen).view(dtype)
    cache = sentinel.clone().to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(DEVICE, dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(DEVICE, dtype)
    tk.write_kv(key, value, cache, slots.to(DEVICE))

    expected = sentinel.clone()
    keep = slots >= 0
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    expected[0, blocks, offsets] = key.cpu()[keep]
    expected[1, blocks, offsets] = value.cpu()[keep]
    assert torch.equal(cache.cpu().view(bits), expected.view(bits))


def test_write_kv_strided_input_and_cast() -> None:
    block_size, kv_heads, head_size, num_tokens = 16, 2, 64, 6
    kv = torch.randn(num_tokens, 2, kv_heads, head_size, device=DEVICE)
    key, value = kv[:, 0], kv[:, 1]  # non-contiguous views, as split from a fused projection
    # float16, not bfloat16: the interpreter truncates float32 -> bfloat16 instead of rounding.
    cache = torch.zeros(2, 3, block_size, kv_heads, head_size, dtype=torch.float16, device=DEVICE)
    slots = torch.tensor([3, 40, -1, 17, 0, 47], device=DEVICE)
    tk.write_kv(key, value, cache, slots)
    expected = torch.zeros_like(cache)
    reference.write_kv(key, value, expected, slots)
    assert torch.equal(cache, expected)


def test_copy_blocks() -> None:
    caches = [torch.randn(2, 6, 16, 2, 8, device=DEVICE) for _ in range(3)]
    before = [c.clone() for c in caches]
    tk.copy_blocks(caches, [(1, 4), (2, 5)])
    for c, b in zip(caches, before, strict=True):
        assert torch.equal(c[:, 4], b[:, 1]) and torch.equal(c[:, 5], b[:, 2])
        assert torch.equal(c[:, :4], b[:, :4])
    tk.copy_blocks(caches, [])


# --- backends: the parts that need no GPU -------------------------------------------------------


def _model(head_size: int = 64, num_heads: int = 8, num_kv_heads: int = 2) -> ModelConfig:
    return ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 100,
            "hidden_size": head_size * num_heads,
            "head_dim": head_size,
            "num_hidden_layers": 2,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
        }
    )


def test_cuda_check() -> None:
    backend = CUDABackend()
    engine = EngineConfig(max_model_len=128, block_size=16)
    assert backend.check(_model(), engine, torch.bfloat16) == []
    assert (
        backend.check(_model(head_size=80, num_heads=7, num_kv_heads=1), engine, torch.float16)
        == []
    )
    assert "dtype" in backend.check(_model(), engine, torch.float64)[0]
    assert "head sizes" in backend.check(_model(head_size=512), engine, torch.float16)[0]
    for block_size in (1, 8, 12):  # the kernel gathers keys page by page: any page size
        small = EngineConfig(max_model_len=128, block_size=block_size)
        assert backend.check(_model(), small, torch.float16) == []
    assert backend.device == torch.device("cuda", 0)


def test_probes_do_not_start_a_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    assert not CUDABackend.probe().available and not ROCmBackend.probe().available
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm" in CUDABackend.probe().reason
    rocm = ROCmBackend.probe()
    assert rocm.available == os.path.exists("/dev/kfd")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr("hwlm.backends.cuda._nvidia_gpus", lambda: ["NVIDIA H100 80GB HBM3"] * 2)
    probe = CUDABackend.probe()
    assert probe.available and probe.score == 100 and "2 x NVIDIA H100 80GB HBM3" in probe.reason
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not CUDABackend.probe().available
    if DEVICE.type == "cpu":
        assert not torch.cuda.is_initialized()


def test_gpu_discovery_files(tmp_path) -> None:
    for i, model in enumerate(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"]):
        gpu = tmp_path / "nvidia" / f"0000:0{i}:00.0"
        gpu.mkdir(parents=True)
        (gpu / "information").write_text(f"Model: \t\t {model}\nIRQ:   42\n")
    assert _nvidia_gpus(str(tmp_path / "nvidia")) == ["NVIDIA H100 80GB HBM3"] * 2
    for i, props in enumerate(["simd_count 0\n", "simd_count 304\ngfx_target_version 90402\n"]):
        node = tmp_path / "kfd" / str(i)
        node.mkdir(parents=True)
        (node / "properties").write_text(props)
    assert _amd_gpu_names(str(tmp_path / "kfd")) == ["gfx942"]


def test_rocm_reason_says_unvalidated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr("hwlm.backends.rocm.os.path.exists", lambda path: path == "/dev/kfd")
    monkeypatch.setattr("hwlm.backends.rocm._amd_gpu_names", lambda: ["gfx942"])
    probe = ROCmBackend.probe()
    assert probe.available and "1 x gfx942" in probe.reason
    assert "not validated on AMD hardware" in probe.reason
    assert ROCmBackend.warp_size == 64 and ROCmBackend.name == "rocm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [64, 896, 1000])
def test_fused_norm_and_activation_round_like_torch(dtype: torch.dtype, cols: int) -> None:
    """Within a few units in the last place of the portable torch ops (Backend's defaults): the
    sum of squares may be added in another order, which can flip each of the two roundings."""
    from hwlm.backend import Backend

    ulp = 4 * torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(cols)
    wide = torch.randn(7, cols + 16, generator=g).to(dtype).to(DEVICE)
    x = wide[:, :cols]  # rows with a stride: the kernel must not assume contiguity
    w = torch.rand(cols, generator=g).add(0.5).to(dtype).to(DEVICE)
    norm_got = tk.rms_norm(x, w, 1e-5)
    assert norm_got.shape == x.shape
    norm_want = Backend.rms_norm(None, x, w, 1e-5)  # type: ignore[arg-type]
    torch.testing.assert_close(norm_got, norm_want, rtol=ulp, atol=ulp)
    both = torch.randn(3, 5, 2 * cols, generator=g).to(dtype).to(DEVICE)
    act_got = tk.silu_and_mul(both)
    assert act_got.shape == (3, 5, cols)
    act_want = Backend.silu_and_mul(None, both)  # type: ignore[arg-type]
    torch.testing.assert_close(act_got, act_want, rtol=ulp, atol=ulp)


def test_interpreter_rounds_like_a_gpu() -> None:
    """Under TRITON_INTERPRET=1, hwlm.kernels.triton makes the interpreter cast float32 ->
    bfloat16 to nearest even and take ``tl.fma`` with one rounding, as compiled kernels do (the
    bit-for-bit tests below rely on it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, bf_ptr, x_ptr, y_ptr, z_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n)
        tl.store(bf_ptr + i, x.to(tl.bfloat16), mask=i < n)
        y, z = tl.load(y_ptr + i, mask=i < n), tl.load(z_ptr + i, mask=i < n)
        tl.store(out_ptr + i, tl.fma(x, y, z), mask=i < n)

    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([1.00390625, 1.01171875, -1.00390625, 3.4e38, float("inf")])  # x.5 ulps
    x = torch.cat([torch.randn(1000, generator=g), ties]).to(DEVICE)
    y, z = torch.randn(2, x.numel(), generator=g).to(DEVICE)
    bf = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty_like(x)
    kernel[(1,)](out, bf, x, y, z, x.numel(), BLOCK=1024)
    assert torch.equal(bf, x.to(torch.bfloat16))
    assert torch.equal(out[:1000], (x.double() * y.double() + z.double()).float()[:1000])


def _qkv_views(
    rows: int, num_heads: int, num_kv_heads: int, d: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [rows, (h + 2 kv) d]; q and k as its strided views; cos/sin [rows, 1, d/2] as
    ``RotaryEmbedding`` hands them over (views of one gathered cos|sin table)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [num_heads * d, num_kv_heads * d, num_kv_heads * d]
    qkv = torch.randn(rows, sum(sizes), generator=g).to(dtype).to(DEVICE)
    q, k, _ = qkv.split(sizes, dim=-1)
    angles = torch.rand(rows, d // 2, generator=g) * 300
    table = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype).to(DEVICE)
    cos, sin = table.unsqueeze(1).chunk(2, dim=-1)
    return qkv, q.view(rows, num_heads, d), k.view(rows, num_kv_heads, d), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_size"), [(14, 2, 64), (4, 4, 80)])
def test_rotary_equals_torch_bit_for_bit(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int
) -> None:
    """Exactly ``apply_rotary`` on q and on k (the Backend default), computed by torch on the
    CPU, whose ``addcmul_`` is one fused multiply-add in float32 (the kernel's ``tl.fma``)."""
    from hwlm.backend import Backend

    qkv, q, k, cos, sin = _qkv_views(9, num_heads, num_kv_heads, head_size, dtype, head_size)
    before = qkv.clone()
    q_got, k_got = tk.rotary(q, k, cos, sin)
    assert q_got.is_contiguous() and k_got.is_contiguous()
    assert q_got.shape == q.shape and k_got.shape == k.shape
    assert torch.equal(qkv, before), "q and k must not be modified"
    cpu = [t.cpu() for t in (q, k, cos, sin)]
    q_want, k_want = Backend.rotary(None, *cpu)  # type: ignore[arg-type]
    assert torch.equal(q_got.cpu(), q_want) and torch.equal(k_got.cpu(), k_want)
    # cos/sin as [rows, d / 2], and contiguous q (Qwen3's normalised heads): the same result.
    q2, k2 = tk.rotary(q.contiguous(), k, cos.squeeze(1), sin.squeeze(1))
    assert torch.equal(q2, q_got) and torch.equal(k2, k_got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [64, 1000])
def test_add_rms_norm_equals_add_then_rms_norm(dtype: torch.dtype, cols: int) -> None:
    """The sum is torch's ``x + residual`` bit for bit, written over ``residual``; the norm is
    exactly the (unfused) RMSNorm kernel's on that sum."""
    g = torch.Generator().manual_seed(cols)
    wide = torch.randn(7, cols + 16, generator=g).to(dtype).to(DEVICE)
    x = wide[:, :cols]  # rows with a stride
    residual = torch.randn(7, cols, generator=g).mul(3).to(dtype).to(DEVICE)
    w = torch.rand(cols, generator=g).add(0.5).to(dtype).to(DEVICE)
    x_before = x.clone()
    want_sum = x + residual
    want_norm = tk.rms_norm(want_sum, w, 1e-5)
    normed, new_residual = tk.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(new_residual, want_sum) and torch.equal(normed, want_norm)
    assert new_residual.data_ptr() == residual.data_ptr(), "the sum is written in place"
    assert torch.equal(x, x_before), "x must not be modified"
    # A residual without unit column stride is copied first; the returned sum is still right.
    strided = torch.randn(7, 2 * cols, generator=g).to(dtype).to(DEVICE)[:, ::2]
    want_sum = x + strided
    normed, new_residual = tk.add_rms_norm(x, strided, w, 1e-5)
    assert torch.equal(new_residual, want_sum)
    assert torch.equal(normed, tk.rms_norm(want_sum, w, 1e-5))


def test_fused_ops_on_empty_batches() -> None:
    w = torch.ones(64, device=DEVICE)
    empty = torch.ones(0, 64, device=DEVICE)
    normed, res = tk.add_rms_norm(empty, empty.clone(), w, 1e-5)
    assert normed.shape == res.shape == (0, 64)
    _, q, k, cos, sin = _qkv_views(0, 4, 2, 64, torch.float32, 0)
    q_out, k_out = tk.rotary(q, k, cos, sin)
    assert q_out.shape == (0, 4, 64) and k_out.shape == (0, 2, 64)


def test_fused_ops_read_no_device_value_on_host(monkeypatch: pytest.MonkeyPatch) -> None:
    if INTERPRET:
        pytest.skip("the interpreter itself copies tensors to the host")
    _, q, k, cos, sin = _qkv_views(5, 8, 2, 128, torch.bfloat16, 1)
    x, residual = torch.randn(2, 5, 512, device=DEVICE, dtype=torch.bfloat16)
    w = torch.ones(512, device=DEVICE, dtype=torch.bfloat16)
    torch.cuda.synchronize()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a fused op")

    for name in ("item", "tolist", "cpu", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    tk.add_rms_norm(x, residual, w, 1e-6)
    tk.rotary(q, k, cos, sin)


def test_fused_ops_replay_in_a_cuda_graph() -> None:
    """Captured once, replayed on new inputs in the same buffers: the results of eager calls."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    qkv, q, k, cos, sin = _qkv_views(6, 14, 2, 64, torch.bfloat16, 2)
    x, residual = torch.randn(2, 6, 896, device=DEVICE, dtype=torch.bfloat16)
    w = torch.rand(896, device=DEVICE, dtype=torch.bfloat16)
    tk.rotary(q, k, cos, sin)  # compile before capturing
    tk.add_rms_norm(x, residual.clone(), w, 1e-6)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    res_buffer = residual.clone()
    with torch.cuda.graph(graph):
        q_out, k_out = tk.rotary(q, k, cos, sin)
        normed, new_res = tk.add_rms_norm(x, res_buffer, w, 1e-6)
    for seed in (3, 4):
        g = torch.Generator().manual_seed(seed)
        qkv.copy_(torch.randn(qkv.shape, generator=g).to(qkv.dtype))
        x.copy_(torch.randn(x.shape, generator=g).to(x.dtype))
        res_buffer.copy_(residual)  # the graph writes the sum over it
        graph.replay()
        q_want, k_want = tk.rotary(q, k, cos, sin)
        norm_want, res_want = tk.add_rms_norm(x, residual.clone(), w, 1e-6)
        assert torch.equal(q_out, q_want) and torch.equal(k_out, k_want)
        assert torch.equal(normed, norm_want) and torch.equal(new_res, res_want)


def test_cuda_memory_budget_counts_the_warm_up_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory_utilization x total, less memory outside torch, less torch's peak since
    prepare_model (weights + the warm-up step); never negative."""
    gib = 2**30
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset")
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (50 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 26 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 20 * gib)
    backend = CUDABackend()
    backend.prepare_model(torch.nn.Linear(2, 2))
    assert calls == ["sync", "reset"]
    # 30 GiB in use, 26 of it torch's: 4 GiB outside torch; 0.9 x 80 - 4 - 20 = 48 GiB.
    assert backend.memory_budget(0.9) == int(0.9 * 80 * gib) - 24 * gib
    assert calls[-1] == "empty"
    assert backend.memory_budget(0.25) == 0
