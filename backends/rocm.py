"""AMD GPUs through PyTorch's ROCm (HIP) build, with the same Triton kernels as ``cuda``.

Differences from ``cuda``: detection (``torch.version.hip`` and the ``/dev/kfd`` compute device,
read without starting the HIP runtime) and launch settings sized for 64-wide wavefronts. PyTorch
exposes HIP devices as ``cuda``, so memory queries and synchronisation are inherited.
"""

from __future__ import annotations

import glob
import os
from typing import ClassVar

import torch

from hwlm.backend import ProbeResult

from .cuda import CUDABackend, _describe

_NOT_VALIDATED = "not validated on AMD hardware"


def _amd_gpu_names(topology_dir: str = "/sys/class/kfd/kfd/topology/nodes") -> list[str]:
    """gfx targets of the GPU nodes in the KFD topology (CPU nodes have no SIMDs)."""
    names = []
    for props in sorted(glob.glob(os.path.join(topology_dir, "*", "properties"))):
        fields: dict[str, str] = {}
        try:
            with open(props) as f:
                for line in f:
                    key, _, value = line.strip().partition(" ")
                    fields[key] = value
        except OSError:
            continue
        if int(fields.get("simd_count", "0") or 0) == 0:
            continue
        version = int(fields.get("gfx_target_version", "0") or 0)
        major, minor, step = version // 10000, version // 100 % 100, version % 100
        names.append(f"gfx{major}{minor:x}{step:x}" if version else "AMD GPU")
    return names


class ROCmBackend(CUDABackend):
    name = "rocm"
    warp_size: ClassVar[int] = 64  # AMD wavefronts; kernels halve num_warps to keep thread counts
    # MI300 GPUs use the e4m3 variant float8_e4m3fnuz, which the kernels do not handle yet.
    kv_cache_dtypes = ("auto",)
    quantizations: ClassVar[tuple[str, ...]] = ()  # not yet run on AMD GPUs (fp8 there: fnuz)

    @classmethod
    def probe(cls) -> ProbeResult:
        if torch.version.hip is None:
            return ProbeResult(False, 0, "this PyTorch build has no ROCm (HIP) support")
        if not os.path.exists("/dev/kfd"):
            return ProbeResult(False, 0, "no AMD GPU found (/dev/kfd is missing)")
        names = _amd_gpu_names()
        found = _describe(names) or "AMD GPU"
        return ProbeResult(True, 100, f"{found} (ROCm {torch.version.hip}); {_NOT_VALIDATED}")
