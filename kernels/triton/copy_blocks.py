"""Copy-on-write block copies: one batched index copy per layer (no custom kernel needed)."""

from __future__ import annotations

import torch


def copy_blocks(kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
    """For each (src, dst) copy block ``src`` to ``dst`` (keys and values) in every layer.

    Destinations must be distinct and no destination may also be a source in the same call
    (true for copy-on-write, whose destinations are freshly allocated blocks).
    """
    if not pairs or not kv_caches:
        return
    device = kv_caches[0].device
    src = torch.tensor([s for s, _ in pairs], dtype=torch.int64).to(device, non_blocking=True)
    dst = torch.tensor([d for _, d in pairs], dtype=torch.int64).to(device, non_blocking=True)
    for cache in kv_caches:
        if cache.dtype == torch.float8_e4m3fn:  # copy the bytes: not every torch has fp8 index_put
            cache = cache.view(torch.uint8)
        cache[:, dst] = cache[:, src]
