"""Numba kernels for the CPU backend.

Threading layer: OpenMP first. numba's OpenMP layer is loaded after torch, which has put its own
libgomp in the global symbol scope, so numba's parallel regions run on torch's OpenMP thread pool:
one pool for the whole process, whose threads are still hot when a kernel follows a torch op. The
layers with a pool of their own measured slower after torch ops (2 cores, target model: decode
attention 0.76 ms with OpenMP against 1.7 ms with TBB and 2.0 ms with workqueue, whose launches
also cost ~0.1 ms each), because the two pools then compete for the same cores. numba's default
order would prefer TBB where it is installed, hence the explicit priority; NUMBA_THREADING_LAYER
or NUMBA_THREADING_LAYER_PRIORITY set by the user win.

Limitation (GNU OpenMP, enforced by numba): a process forked after a kernel ran must not run one
itself; numba terminates it. Start worker processes with "spawn" or "forkserver".
"""

import os

import numba

_PRIORITY = ["omp", "tbb", "workqueue"]
if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
    numba.config.THREADING_LAYER_PRIORITY = _PRIORITY  # type: ignore[attr-defined]

from hwlm.kernels.numba.fused import add_rms_norm, rms_norm, rotary, silu_and_mul  # noqa: E402
from hwlm.kernels.numba.greedy import greedy_sample  # noqa: E402
from hwlm.kernels.numba.paged_attention import paged_attention, write_kv  # noqa: E402

__all__ = [
    "paged_attention",
    "write_kv",
    "rms_norm",
    "add_rms_norm",
    "rotary",
    "silu_and_mul",
    "greedy_sample",
]
