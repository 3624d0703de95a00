"""Triton kernels for the cuda and rocm backends: paged attention, KV-cache writes, block copies,
fused RMSNorm (alone and after the residual add), SiLU-and-mul, rotary embedding, and greedy
sampling (argmax and its log-probability in one pass).

Importing this package imports triton; backends import it lazily so that ``probe()`` works on
machines without triton.
"""

from __future__ import annotations

import os
from typing import Any


def _fix_interpreter_scalar_index() -> None:
    """Let the Triton interpreter use runtime loop bounds under NumPy >= 2.4.

    The interpreter holds scalars as 1-element arrays and turns them into Python ints with
    ``int(array)``, which NumPy 2.4 rejects, so ``for i in range(lo, hi, step)`` with runtime
    bounds fails (triton-lang/triton#9171, fixed upstream by #9172 after triton 3.6). Applied
    only under ``TRITON_INTERPRET=1`` and only where the bug is present; compiled kernels are
    unaffected.
    """
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this NumPy still converts 1-element arrays
    except TypeError:
        pass
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_hwlm_index_fix", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._hwlm_index_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _fix_interpreter_scalar_index()
    from hwlm.kernels.triton.interpreter_rounding import install as _round_like_a_gpu

    _round_like_a_gpu()

from hwlm.kernels.triton.copy_blocks import copy_blocks  # noqa: E402
from hwlm.kernels.triton.fused import (  # noqa: E402
    add_rms_norm,
    rms_norm,
    rotary,
    silu_and_mul,
)
from hwlm.kernels.triton.greedy import greedy_sample, masked_greedy_sample  # noqa: E402
from hwlm.kernels.triton.paged_attention import (  # noqa: E402
    AttentionLaunch,
    choose_launch,
    paged_attention,
)
from hwlm.kernels.triton.write_kv import write_kv  # noqa: E402

__all__ = [
    "AttentionLaunch",
    "add_rms_norm",
    "choose_launch",
    "copy_blocks",
    "greedy_sample",
    "masked_greedy_sample",
    "paged_attention",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "write_kv",
]
