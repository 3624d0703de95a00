"""Llama 3.1-style rope scaling from a GGUF file's ``rope_freqs`` tensor.

llama.cpp's converter does not store the scaling parameters of ``rope_type: llama3``; it writes
one divisor per rotary frequency (``rope_freqs.weight``) computed from them. The divisors of the
released Llama 3.1/3.2 models come from ``factor`` (the largest divisor), ``low_freq_factor``
1, ``high_freq_factor`` 4 and an original context of 8192: those are tried, and the scaling is
accepted only when it reproduces every divisor. Anything else is refused in one line.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_STANDARD = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_divisors(theta: float, rotary_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """The divisor of each rotary frequency that ``rope_type: llama3`` applies."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    out = []
    for i in range(0, rotary_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / rotary_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def rope_scaling_from_freqs(
    divisors: np.ndarray, theta: float, rotary_dim: int, name: str
) -> dict[str, Any]:
    """The ``rope_scaling`` dict that produces ``divisors``; ValueError (one line) if none of
    the known ones does."""
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **_STANDARD}
    expected = llama3_divisors(theta, rotary_dim, scaling)
    if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-4):
        raise ValueError(
            f"GGUF file {name}: its rope_freqs are not Llama 3's rope scaling with the usual "
            "parameters, which is all hwlm can read back from a GGUF file"
        )
    return scaling
