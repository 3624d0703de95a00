"""One-pass float32 kernels for the dense layers' elementwise work (CPU backend).

torch runs ``silu(gate) * up`` and RMSNorm as several passes over the activations, each with a
temporary; on a CPU those passes are memory-bound. These read each input once and write once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from hwlm.kernels.numba.paged_attention import Array, _exp


@njit(parallel=True, fastmath=True, cache=True)
def _silu_and_mul(x: Array, out: Array) -> None:
    rows, width = out.shape
    for i in prange(rows):
        for j in range(width):
            g = x[i, j]
            e = _exp(-abs(g))  # exp of a non-positive number: never overflows
            sigmoid = (
                np.float32(1.0) / (np.float32(1.0) + e) if g >= 0 else e / (np.float32(1.0) + e)
            )
            out[i, j] = g * sigmoid * x[i, width + j]


@njit(parallel=True, fastmath=True, cache=True)
def _rms_norm(x: Array, weight: Array, eps: np.float32, out: Array) -> None:
    rows, width = x.shape
    for i in prange(rows):
        total = np.float32(0.0)
        for j in range(width):
            total += x[i, j] * x[i, j]
        inv = np.float32(1.0) / np.float32(math.sqrt(total / width + eps))
        for j in range(width):
            out[i, j] = x[i, j] * inv * weight[j]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :d]) * x[:, d:]`` for float32 ``x`` of shape [n, 2d]."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    if x.shape[0]:
        _silu_and_mul(x.numpy(), out.numpy())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of float32 ``x`` [n, d], times ``weight`` [d]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.shape[0]:
        _rms_norm(x.numpy(), weight.detach().contiguous().numpy(), np.float32(eps), out.numpy())
    return out
