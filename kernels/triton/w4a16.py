"""Weight-only quantized dense layers (W4A16, W8A16): ``y = x dequant(W)^T + b`` with 4- or 8-bit
weight codes in groups along the input, float activations (bf16/fp16/fp32) and fp32 sums.

Layout (``PackedWeight``): codes packed along K into int32 words, ``32 // bits`` codes a word,
code ``k`` of a row in word ``k // per_word`` at bits ``(k % per_word) * bits`` (little end first);
each row is padded with zero words to a multiple of ``ROW_WORDS`` words, so that a K tile of up
to that many words never needs a mask along K (masks that vary along the contiguous dimension
stop Triton from vectorising the loads) and every row starts 256-byte aligned. Element
``(n, k)`` is ``(code - zero[n, g]) * scale[n, g]`` with ``g = k // group_size``; without zero
points the zero is ``2**(bits-1)`` (symmetric). ``group_size`` must be a multiple of ``per_word`` (or the whole
row), so a word never spans two groups.

Three paths, by the number of rows M:

- ``_gemv_kernel`` (M <= ``GEMV_MAX_ROWS``; decode): no tensor cores. A program owns BLOCK_N
  outputs of one row and a K range (split-K: partial sums added atomically into an fp32 buffer,
  so the order of the additions, and the last bits of a sum, can vary from run to run),
  streams the packed words of its rows (contiguous along K, so each row reads whole cache lines),
  and keeps a [BLOCK_N, words] fp32 accumulator that is reduced once at the end. The weights
  are read once per row at half a byte each; compiled for sm_90 the loop takes 6-10
  instructions per weight (docs/quantization.md), so it may be issue-bound rather than
  memory-bound.
- ``_gemm_kernel`` (up to ``DEQUANT_MIN_ROWS``): [BLOCK_M, BLOCK_N] tiles on tensor cores; the
  K tile is split into ``per_word`` interleaved slices (slice i holds codes i, i + per_word, ...),
  so each word's codes are extracted with one shift and no reshape, and each slice is one
  ``tl.dot`` of K = BLOCK_K // per_word.
- above that (prefill): ``_dequant_kernel`` writes the float weights once and torch's matmul
  (cuBLAS) multiplies; compute-bound, so the extra write costs little.

Codes become floats without an int-to-float conversion: ``code | 0x4B000000`` read as float32 is
``2**23 + code``, so one subtraction of ``2**23 + zero`` gives ``code - zero`` exactly (int-to-
float conversions run at a quarter of the FMA rate, and a GEMV at 4 bits is close to ALU-bound).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 4
ROW_WORDS = 64  # words per row are padded to a multiple of this; also the largest K tile
DEQUANT_MIN_ROWS = 1024


@dataclass(frozen=True)
class PackedWeight:
    """A weight in this module's layout (see the module docstring)."""

    bits: int  # 4 or 8
    group_size: int
    out_features: int  # N
    in_features: int  # K
    words: torch.Tensor  # int32 [N, ceil(K / per_word) rounded up to ROW_WORDS]
    scales: torch.Tensor  # float16 or float32 [N, ceil(K / group_size)]
    zeros: torch.Tensor | None  # uint8 [N, ceil(K / group_size)]; None: 2**(bits-1)

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[1])


@dataclass(frozen=True)
class Launch:
    """Launch parameters of one call (``choose_launch``; the benchmark passes its own)."""

    block_m: int  # rows a program owns (1 for the GEMV)
    block_n: int
    block_k: int  # a multiple of per_word * 16 for the tensor-core kernel
    split_k: int
    num_warps: int
    num_stages: int = 2


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 2**bits) -> int32 words [N, W]: ``W`` is ``ceil(K / (32 //
    bits))`` rounded up to ``ROW_WORDS``, the padding all zero."""
    per_word = 32 // bits
    n, k = codes.shape
    words = -(-k // (per_word * ROW_WORDS)) * ROW_WORDS
    padded = torch.zeros(n, words * per_word, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    packed = (padded.view(n, words, per_word) << shifts).sum(-1)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # int32 two's complement
    return packed.to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: uint8 codes [N, in_features]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :in_features].to(torch.uint8)


def dequantize_reference(w: PackedWeight) -> torch.Tensor:
    """float32 [N, K] from the packed words, in torch (independent of the kernels)."""
    codes = unpack_codes(w.words, w.bits, w.in_features).to(torch.float32)
    group_of = torch.arange(w.in_features, device=codes.device) // w.group_size
    scales = w.scales.to(torch.float32)[:, group_of]
    if w.zeros is None:
        zeros: torch.Tensor | float = float(1 << (w.bits - 1))
    else:
        zeros = w.zeros.to(torch.float32)[:, group_of]
    return (codes - zeros) * scales


def choose_launch(w: PackedWeight, rows: int, num_sms: int) -> Launch:
    """Launch parameters for ``rows`` rows of ``w`` on a device with ``num_sms`` multiprocessors.

    The GEMV's come from the H200 sweep of ``ci/quant_kernels_bench.py --rows 1`` over
    Llama-3-8B's shapes (docs/quantization.md; ``HWLM_W4A16_GEMV`` overrides them): K tiles that
    hold one whole group where they can (one scale per row and tile), 128 outputs a program
    (each activation a thread loads serves more rows), and K split into up to 8 ranges of at
    least 4 tiles each. Split-K's two extra launches (zeroing the fp32 buffer, casting it) cost
    less than the parallelism brings: the down projection (N 4096, K 14336) took 22.9 us split 8
    ways against 45.3 unsplit at 16 outputs a program, the fused gate/up 40.2 against 45.9.
    Narrower blocks are taken only when even the split leaves fewer programs than
    multiprocessors."""
    per_word = w.per_word
    k = w.in_features
    if rows <= GEMV_MAX_ROWS:
        override = gemv_override()
        if override is not None:
            return override
        block_k = per_word * 32
        for candidate in (per_word * 32, per_word * 16):
            if w.group_size % candidate == 0:
                block_k = candidate
                break
        k_tiles = -(-k // block_k)
        split = 1
        while split < 8 and k_tiles // (split * 2) >= 4:
            split *= 2
        block_n = 16
        for wide in (128, 64, 32):
            if -(-w.out_features // wide) * rows * split >= num_sms:
                block_n = wide
                break
        return Launch(1, block_n, block_k, split, num_warps=4, num_stages=3)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_k = per_word * 16
    block_n = 64
    programs = -(-w.out_features // block_n) * -(-rows // block_m)
    split = 1
    while programs * split < num_sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return Launch(block_m, block_n, block_k, split, num_warps=4, num_stages=3)


GEMV_ENV = "HWLM_W4A16_GEMV"


def gemv_override() -> Launch | None:
    """The GEMV launch from ``HWLM_W4A16_GEMV=block_n,block_k,split_k,num_warps[,num_stages]``
    (for tuning on new hardware), or None when unset."""
    text = os.environ.get(GEMV_ENV, "").strip()
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) not in (4, 5) or min(values) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{GEMV_ENV} must be block_n,block_k,split_k,num_warps[,num_stages] (positive "
            f"integers), got {text!r}"
        ) from None
    return Launch(1, *values)


def w4a16_linear(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None,
    num_sms: int,
    launch: Launch | None = None,
    dequant_min_rows: int = DEQUANT_MIN_ROWS,
) -> torch.Tensor:
    """``x dequant(w)^T + bias`` for ``x`` [..., K] (float16, bfloat16 or float32) in x's dtype.

    No host synchronisation and no launch that depends on tensor values: CUDA graphs capture it.
    """
    k, n = w.in_features, w.out_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if rows == 0:
        return x.new_empty(*x.shape[:-1], n)
    if rows >= dequant_min_rows and launch is None:
        weight = dequantize(w, x.dtype)
        bias_x = None if bias is None else bias.to(x.dtype)
        return torch.nn.functional.linear(x2, weight, bias_x).view(*x.shape[:-1], n)
    launch = launch or choose_launch(w, rows, num_sms)
    y = _matmul(x2, w, bias, launch)
    return y.view(*x.shape[:-1], n)


def _matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, p: Launch) -> torch.Tensor:
    rows, n = x.shape[0], w.out_features
    words = p.block_k // w.per_word
    if p.block_k % w.per_word or ROW_WORDS % words or (p.block_m > 1 and words < 16):
        raise ValueError(
            f"W4A16: block_k {p.block_k} must be {w.per_word} x a divisor of {ROW_WORDS} "
            "(at least 16 for the tensor-core kernel)"
        )
    atomic = p.split_k > 1
    if atomic:
        y = torch.zeros(rows, n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    k_tiles = -(-w.in_features // p.block_k)
    k_per_split = -(-k_tiles // p.split_k) * p.block_k
    zeros = w.zeros if w.zeros is not None else w.scales  # a dummy pointer when symmetric
    bias_arg = bias if bias is not None else w.scales
    per_tile = w.group_size % p.block_k == 0
    common = dict(
        BITS=w.bits,
        BLOCK_N=p.block_n,
        BLOCK_K=p.block_k,
        HAS_ZEROS=w.zeros is not None,
        HAS_BIAS=bias is not None,
        SCALE_PER_TILE=per_tile,
        ATOMIC=atomic,
        num_warps=p.num_warps,
        num_stages=p.num_stages,
    )
    args = (x, w.words, w.scales, zeros, bias_arg, y, rows, n, w.in_features)
    words_per_split = k_per_split // w.per_word
    sizes = (
        w.words.shape[1],
        w.group_size,
        w.num_groups,
        x.stride(0),
        y.stride(0),
        words_per_split,
    )
    if p.block_m == 1:
        grid = (triton.cdiv(n, p.block_n), p.split_k, rows)
        even_k = w.in_features % p.block_k == 0
        _gemv_kernel[grid](*args, *sizes, EVEN_K=even_k, **common)
    else:
        grid = (triton.cdiv(n, p.block_n), p.split_k, triton.cdiv(rows, p.block_m))
        _gemm_kernel[grid](
            *args,
            *sizes,
            BLOCK_M=p.block_m,
            IEEE=x.dtype == torch.float32,
            UPCAST=_INTERPRETED and x.dtype == torch.bfloat16,
            **common,
        )
    return y.to(x.dtype) if atomic else y


def dequantize(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The float weights [N, K] in ``dtype``, written by ``_dequant_kernel``."""
    n, k = w.out_features, w.in_features
    out = torch.empty(n, k, dtype=dtype, device=w.words.device)
    block_n, block_k = 32, 128
    zeros = w.zeros if w.zeros is not None else w.scales
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        w.words,
        w.scales,
        zeros,
        out,
        n,
        k,
        w.words.shape[1],
        w.group_size,
        w.num_groups,
        BITS=w.bits,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        HAS_ZEROS=w.zeros is not None,
    )
    return out


@triton.jit  # type: ignore[untyped-decorator]
def _scales_and_zeros(
    s_ptr: tl.tensor,
    z_ptr: tl.tensor,
    offs_n: tl.tensor,
    n_ok: tl.tensor,
    k0: tl.tensor,
    offs_w: tl.tensor,
    group_size: tl.tensor,
    num_groups: tl.tensor,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:
    """(scale, 2**23 + zero) of the tile at ``k0``: [BLOCK_N, 1] when the tile lies in one group,
    else [BLOCK_N, WORDS] (one per word)."""
    PER_WORD: tl.constexpr = 32 // BITS
    if SCALE_PER_TILE:
        g = k0 // group_size
        offs = offs_n[:, None] * num_groups + g
        ok = n_ok[:, None] & (g < num_groups)
    else:
        g = (k0 + offs_w * PER_WORD) // group_size
        offs = offs_n[:, None] * num_groups + g[None, :]
        ok = n_ok[:, None] & (g < num_groups)[None, :]
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs, mask=ok, other=0).to(tl.float32) + 8388608.0
    else:
        z = tl.zeros_like(s) + (8388608.0 + (1 << (BITS - 1)))
    return s, z


@triton.jit  # type: ignore[untyped-decorator]
def _gemv_kernel(
    x_ptr: tl.tensor,
    w_ptr: tl.tensor,
    s_ptr: tl.tensor,
    z_ptr: tl.tensor,
    b_ptr: tl.tensor,
    y_ptr: tl.tensor,
    M: tl.tensor,
    N: tl.tensor,
    K: tl.tensor,
    KW: tl.tensor,
    group_size: tl.tensor,
    num_groups: tl.tensor,
    stride_xm: tl.tensor,
    stride_ym: tl.tensor,
    words_per_split: tl.tensor,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    ATOMIC: tl.constexpr,
    EVEN_K: tl.constexpr,
) -> None:
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_w = tl.arange(0, WORDS)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * KW
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    # The loop runs over word indices, multiples of WORDS: Triton then knows each row's tile is
    # 16-word aligned and loads it in 16-byte vectors (k0 // PER_WORD would hide that).
    w_start = pid_k * words_per_split
    w_end = tl.minimum(w_start + words_per_split, (K + PER_WORD - 1) // PER_WORD)
    for w0 in range(w_start, w_end, WORDS):
        k0 = w0 * PER_WORD
        word = w0 + offs_w
        words = tl.load(w_rows + word[None, :], mask=n_ok[:, None], other=0)  # rows padded
        s, z = _scales_and_zeros(
            s_ptr, z_ptr, offs_n, n_ok, k0, offs_w, group_size, num_groups, BITS, HAS_ZEROS,
            SCALE_PER_TILE,
        )  # fmt: skip
        # per_word slices of [BLOCK_N, WORDS] (slice i: code i of every word). Expanding the
        # words to [BLOCK_N, WORDS, PER_WORD] instead reads x in vectors, but Triton then spreads
        # the PER_WORD axis over threads and its sum takes shuffles (3x the instructions, sm_90).
        part = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        bits = words.to(tl.uint32, bitcast=True)  # logical shifts: no sign extension
        for i in tl.static_range(PER_WORD):
            kk = word * PER_WORD + i
            if EVEN_K:  # every tile inside K: no mask (and no compare per load)
                xv = tl.load(x_row + kk).to(tl.float32)
            else:
                xv = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            code = ((bits >> (i * BITS)) & CODE_MASK) | 0x4B000000
            part += (code.to(tl.float32, bitcast=True) - z) * xv[None, :]
        acc += part * s
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, bias, 0.0)
    y = y_ptr + row.to(tl.int64) * stride_ym + offs_n
    if ATOMIC:
        tl.atomic_add(y, out, mask=n_ok)
    else:
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit  # type: ignore[untyped-decorator]
def _gemm_kernel(
    x_ptr: tl.tensor,
    w_ptr: tl.tensor,
    s_ptr: tl.tensor,
    z_ptr: tl.tensor,
    b_ptr: tl.tensor,
    y_ptr: tl.tensor,
    M: tl.tensor,
    N: tl.tensor,
    K: tl.tensor,
    KW: tl.tensor,
    group_size: tl.tensor,
    num_groups: tl.tensor,
    stride_xm: tl.tensor,
    stride_ym: tl.tensor,
    words_per_split: tl.tensor,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    ATOMIC: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
) -> None:
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_w = tl.arange(0, WORDS)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * KW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # The loop runs over word indices, multiples of WORDS: Triton then knows each row's tile is
    # 16-word aligned and loads it in 16-byte vectors (k0 // PER_WORD would hide that).
    w_start = pid_k * words_per_split
    w_end = tl.minimum(w_start + words_per_split, (K + PER_WORD - 1) // PER_WORD)
    for w0 in range(w_start, w_end, WORDS):
        k0 = w0 * PER_WORD
        word = w0 + offs_w
        words = tl.load(w_rows + word[None, :], mask=n_ok[:, None], other=0)  # rows padded
        s, z = _scales_and_zeros(
            s_ptr, z_ptr, offs_n, n_ok, k0, offs_w, group_size, num_groups, BITS, HAS_ZEROS,
            SCALE_PER_TILE,
        )  # fmt: skip
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(PER_WORD):
            kk = word * PER_WORD + i
            xv = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
            code = ((words >> (i * BITS)) & CODE_MASK) | 0x4B000000
            wv = code.to(tl.float32, bitcast=True) - z  # [BLOCK_N, WORDS]: code - zero
            if not SCALE_PER_TILE:
                wv = wv * s
            wt = tl.trans(wv.to(xv.dtype))
            if UPCAST:
                part += tl.dot(xv.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            elif IEEE:
                part += tl.dot(xv, wt, input_precision="ieee")
            else:
                part += tl.dot(xv, wt)
        if SCALE_PER_TILE:  # the tile's scales again as a row vector (no transpose of [N, 1])
            g = k0 // group_size
            s_row = tl.load(
                s_ptr + offs_n * num_groups + g, mask=n_ok & (g < num_groups), other=0.0
            )
            acc += part * s_row.to(tl.float32)[None, :]
        else:
            acc += part
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y, acc, mask=ok)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit  # type: ignore[untyped-decorator]
def _dequant_kernel(
    w_ptr: tl.tensor,
    s_ptr: tl.tensor,
    z_ptr: tl.tensor,
    out_ptr: tl.tensor,
    N: tl.tensor,
    K: tl.tensor,
    KW: tl.tensor,
    group_size: tl.tensor,
    num_groups: tl.tensor,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
) -> None:
    PER_WORD: tl.constexpr = 32 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    words = tl.load(w_ptr + rows * KW + (offs_k // PER_WORD)[None, :], mask=ok, other=0)
    code = ((words >> ((offs_k % PER_WORD) * BITS)[None, :]) & CODE_MASK) | 0x4B000000
    g = rows * num_groups + (offs_k // group_size)[None, :]
    s = tl.load(s_ptr + g, mask=ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + g, mask=ok, other=0).to(tl.float32) + 8388608.0
    else:
        z = 8388608.0 + (1 << (BITS - 1))
    value = (code.to(tl.float32, bitcast=True) - z) * s
    tl.store(out_ptr + rows * K + offs_k[None, :], value.to(out_ptr.dtype.element_ty), mask=ok)


# The Triton interpreter (3.6) holds bfloat16 as uint16 and its tl.dot multiplies those integers;
# interpreted bfloat16 tiles therefore multiply in float32 (after the same rounding to bfloat16).
_INTERPRETED = not isinstance(_gemm_kernel, triton.runtime.JITFunction)
