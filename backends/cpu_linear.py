"""Dense layers for the CPU backend: weights repacked once into oneDNN's blocked layout.

torch's default CPU ``F.linear`` goes through a BLAS sgemm that repacks the weight on every call
and, on some CPUs (AMD EPYC measured), picks a slow code path. oneDNN's linear with a weight
reordered ahead of time runs the same float32 products 2-3x faster on the 2-core development
machine, from 8-row decode batches (225 vs 61 GFLOP/s) to 5,000-row prefills (330 vs 164).

The reordered weight replaces the layer's own copy, so memory does not double. Row counts are
rounded up to a bounded set of sizes (``bucket_rows``) so that oneDNN's per-shape kernels stay
few. Set
HWLM_CPU_ONEDNN=0 to keep torch's default path (for comparison).
"""

from __future__ import annotations

import logging
import os
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class PackedLinear:
    """``x W^T + b`` from a oneDNN-reordered ``W``; accepts any leading shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        padded = bucket_rows(rows)
        if padded == rows:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.packed, self.bias, "none", [], ""
            )
            return out
        x2 = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x2, self.packed, self.bias, "none", [], ""
        )
        return y[:rows].view(*x.shape[:-1], y.shape[-1])


def bucket_rows(rows: int) -> int:
    """``rows`` rounded up to one of a few sizes: exact up to 16, then 8 steps per doubling.

    oneDNN builds (and keeps) a kernel for every batch shape it meets, about 4 MB each for a
    4096 x 768 weight; with every token count its own shape, a server's memory grew for as long
    as new counts kept coming (1.1 GB for 1,200 counts). Rounded, 1,200 counts are 66 shapes and
    the growth stops (292 MB, flat after the first pass), for at most 12.5% padded rows.
    """
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


@cache
def onednn_usable(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run a packed oneDNN linear in ``dtype``, and it agrees
    with ``F.linear`` on a small product (checked once per dtype)."""
    if os.environ.get("HWLM_CPU_ONEDNN", "1") == "0":
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 40, generator=gen).to(dtype)
        x = torch.randn(5, 40, generator=gen).to(dtype)
        got = PackedLinear(weight, None)(x).float()
        want = torch.nn.functional.linear(x.float(), weight.float())
    except (RuntimeError, AttributeError) as err:  # no mkldnn ops in this build or on this CPU
        logger.info("oneDNN linear unavailable (%s); using torch's default", err)
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(got, want, rtol=tolerance, atol=tolerance))


def pack_linear_layers(model: nn.Module) -> int:
    """Give every ``Linear`` of ``model`` (and its LM head) a packed kernel; returns how many."""
    from hwlm.models import CausalLM
    from hwlm.models.layers import Linear

    lm_head = getattr(model, "lm_head", None)
    count = 0
    for module in model.modules():
        if module is lm_head or not isinstance(module, Linear) or module.kernel is not None:
            continue  # the head is packed below; a kernel already set is a quantized one
        if onednn_usable(module.weight.dtype):
            module.kernel = PackedLinear(module.weight, module.bias)
            _release(module.weight)
            count += 1
    if (
        isinstance(model, CausalLM)
        and model.logits_kernel is None
        and onednn_usable(model.lm_head.weight.dtype)
    ):
        model.logits_kernel = PackedLinear(model.lm_head.weight, None)
        if isinstance(model.lm_head, Linear):
            _release(model.lm_head.weight)
        count += 1
    return count


def _release(weight: torch.Tensor) -> None:
    """Free a weight whose only user is now the packed kernel."""
    weight.data = torch.empty(0, dtype=weight.dtype)
