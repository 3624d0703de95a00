"""Numba kernels for the CPU backend.

Threading layer: numba picks TBB, else OpenMP, else its own workqueue. Here TBB is usually absent
and numba's OpenMP is the system libgomp, a second OpenMP runtime beside the one torch bundles:
both pools busy-wait after each parallel region, so alternating torch ops and numba kernels on
the same cores oversubscribe them (on a shared 2-core machine numba launches went from ~0.05 ms to
~1 ms), and a process forked after a numba OpenMP launch aborts when it launches one itself. The
workqueue layer blocks instead of spinning and survives fork; it is not safe for concurrent
launches, which ``paged_attention`` serialises with a lock. A user's NUMBA_THREADING_LAYER wins,
and so does any layer already started by earlier numba code in the process.
"""

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"  # type: ignore[attr-defined]

from hwlm.kernels.numba.paged_attention import paged_attention, write_kv  # noqa: E402

__all__ = ["paged_attention", "write_kv"]
