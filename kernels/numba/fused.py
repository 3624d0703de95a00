"""One-pass float32 kernels for the dense layers' elementwise work (CPU backend).

torch runs ``silu(gate) * up``, RMSNorm (with the residual add before it) and rotary embedding
as several passes over the activations, each with a temporary and a dispatch of its own; on a
CPU those passes are memory-bound, and at decode sizes the dispatches cost more than the work.
These read each input once and write once.

Each kernel has a parallel and a serial build. Small inputs (a decode step of a few sequences)
run serially on the calling thread: waking the OpenMP pool costs more than their work (an RMSNorm
of one 768-wide row took ~12 us through the pool inside a decode step, ~1 us without it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from hwlm.kernels.numba.paged_attention import Array, _exp

# Inputs of fewer elements than this run serially (see the module docstring).
SERIAL_MAX_ELEMENTS = 8192


@njit(fastmath=True, inline="always", cache=True, error_model="numpy")
def _silu_and_mul_row(x: Array, out: Array, i: int) -> None:
    width = out.shape[1]
    for j in range(width):
        g = x[i, j]
        e = _exp(-abs(g))  # exp of a non-positive number: never overflows
        sigmoid = np.float32(1.0) / (np.float32(1.0) + e) if g >= 0 else e / (np.float32(1.0) + e)
        out[i, j] = g * sigmoid * x[i, width + j]


@njit(fastmath=True, inline="always", cache=True, error_model="numpy")
def _rms_norm_row(x: Array, weight: Array, eps: np.float32, out: Array, i: int) -> None:
    width = x.shape[1]
    total = np.float32(0.0)
    for j in range(width):
        total += x[i, j] * x[i, j]
    inv = np.float32(1.0) / np.float32(math.sqrt(total / width + eps))
    for j in range(width):
        out[i, j] = x[i, j] * inv * weight[j]


@njit(inline="always", cache=True, error_model="numpy")
def _add_row(x: Array, residual: Array, i: int) -> None:
    for j in range(x.shape[1]):  # no fastmath: the sum is rounded once, as torch's add
        residual[i, j] = x[i, j] + residual[i, j]


@njit(inline="always", cache=True, error_model="numpy")
def _rotary_row(x: Array, cos: Array, sin: Array, out: Array, t: int) -> None:
    half = cos.shape[1]
    for h in range(x.shape[1]):
        for j in range(half):
            x1, x2, c, s = x[t, h, j], x[t, h, half + j], cos[t, j], sin[t, j]
            out[t, h, j] = x1 * c - x2 * s
            out[t, h, half + j] = x2 * c + x1 * s


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _silu_and_mul(x: Array, out: Array) -> None:
    for i in prange(out.shape[0]):
        _silu_and_mul_row(x, out, i)


@njit(fastmath=True, cache=True, error_model="numpy")
def _silu_and_mul_serial(x: Array, out: Array) -> None:
    for i in range(out.shape[0]):
        _silu_and_mul_row(x, out, i)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _rms_norm(x: Array, weight: Array, eps: np.float32, out: Array) -> None:
    for i in prange(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, i)


@njit(fastmath=True, cache=True, error_model="numpy")
def _rms_norm_serial(x: Array, weight: Array, eps: np.float32, out: Array) -> None:
    for i in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, i)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _add_rms_norm(x: Array, residual: Array, weight: Array, eps: np.float32, out: Array) -> None:
    for i in prange(x.shape[0]):
        _add_row(x, residual, i)
        _rms_norm_row(residual, weight, eps, out, i)


@njit(fastmath=True, cache=True, error_model="numpy")
def _add_rms_norm_serial(
    x: Array, residual: Array, weight: Array, eps: np.float32, out: Array
) -> None:
    for i in range(x.shape[0]):
        _add_row(x, residual, i)
        _rms_norm_row(residual, weight, eps, out, i)


@njit(parallel=True, cache=True, error_model="numpy")
def _rotary(x: Array, cos: Array, sin: Array, out: Array) -> None:
    for t in prange(x.shape[0]):
        _rotary_row(x, cos, sin, out, t)


@njit(cache=True, error_model="numpy")
def _rotary_serial(x: Array, cos: Array, sin: Array, out: Array) -> None:
    for t in range(x.shape[0]):
        _rotary_row(x, cos, sin, out, t)


def _serial(x: torch.Tensor) -> bool:
    return x.numel() < SERIAL_MAX_ELEMENTS


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :d]) * x[:, d:]`` for float32 ``x`` of shape [n, 2d]."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    if x.shape[0]:
        kernel = _silu_and_mul_serial if _serial(x) else _silu_and_mul
        kernel(x.numpy(), out.numpy())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of float32 ``x`` [n, d], times ``weight`` [d]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.shape[0]:
        kernel = _rms_norm_serial if _serial(x) else _rms_norm
        kernel(x.numpy(), weight.detach().numpy(), np.float32(eps), out.numpy())
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` for float32 [n, d]; the sum is written over
    ``residual`` when it is contiguous (and returned)."""
    x = x.contiguous()
    total = residual if residual.is_contiguous() else residual.contiguous()
    out = torch.empty_like(x)
    if x.shape[0]:
        kernel = _add_rms_norm_serial if _serial(x) else _add_rms_norm
        kernel(x.numpy(), total.numpy(), weight.detach().numpy(), np.float32(eps), out.numpy())
    return out, total


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of float32 ``q`` [n, heads, d] and ``k`` [n, kv_heads, d]
    (strided views allowed) with ``cos``/``sin`` [n, 1, d // 2]; new contiguous outputs."""
    c = cos.detach().reshape(cos.shape[0], -1).numpy()  # strided views of the cos/sin table
    s = sin.detach().reshape(sin.shape[0], -1).numpy()
    outs = []
    for x in (q, k):
        out = torch.empty(x.shape, dtype=x.dtype)
        if x.shape[0]:
            kernel = _rotary_serial if _serial(x) else _rotary
            kernel(x.detach().numpy(), c, s, out.numpy())
        outs.append(out)
    return outs[0], outs[1]
