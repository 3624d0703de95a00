"""Stacking the pre-quantized shards of a fused projection (q/k/v, gate/up) along the output."""

from __future__ import annotations

import torch

from hwlm.models.quantized_weight import Fp8Weight, GroupQuantizedWeight, PrequantizedWeight


def stack_shards(shards: list[PrequantizedWeight], name: str) -> PrequantizedWeight:
    """One weight whose rows are the shards' rows in order; ValueError (one line) when the
    shards are not quantized alike (bits, group size, kind)."""
    if len(shards) == 1:
        return shards[0]
    if all(isinstance(s, GroupQuantizedWeight) for s in shards):
        return _stack_groups([s for s in shards if isinstance(s, GroupQuantizedWeight)], name)
    if all(isinstance(s, Fp8Weight) for s in shards):
        return _stack_fp8([s for s in shards if isinstance(s, Fp8Weight)])
    raise ValueError(f"{name}: the fused projections are quantized in different formats")


def _stack_groups(shards: list[GroupQuantizedWeight], name: str) -> GroupQuantizedWeight:
    first = shards[0]
    for shard in shards[1:]:
        if (shard.bits, shard.group_size) != (first.bits, first.group_size):
            raise ValueError(
                f"{name}: the fused projections differ in bits or group size "
                f"({first.bits}/{first.group_size} vs {shard.bits}/{shard.group_size})"
            )
    zeros = None
    if any(s.zeros is not None for s in shards):
        zeros = torch.cat([s.zero_points() for s in shards])
    scales = torch.cat([s.scales.to(torch.float32) for s in shards])
    return GroupQuantizedWeight(
        first.bits, first.group_size, torch.cat([s.codes for s in shards]), scales, zeros
    )


def _stack_fp8(shards: list[Fp8Weight]) -> Fp8Weight:
    weight = torch.cat([s.weight for s in shards])
    scales = [s.scale.to(torch.float32).reshape(-1) for s in shards]
    if all(s.numel() == 1 for s in scales) and all(torch.equal(s, scales[0]) for s in scales):
        return Fp8Weight(weight, scales[0].reshape(()))
    rows = [
        s.expand(w.weight.shape[0]) if s.numel() == 1 else s
        for s, w in zip(scales, shards, strict=True)
    ]
    return Fp8Weight(weight, torch.cat(rows))
