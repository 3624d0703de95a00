"""Pre-quantized checkpoint weights on the CPU (``Backend.prequantized_linear``).

A ``GroupQuantizedWeight`` (AWQ, GPTQ, GGUF Q4_0/Q8_0) of 4 or 8 bits in groups of a power of
two >= 16 is packed into MatMulNBits' layout (``cpu_quant_pack.BlockQuantized``) with its own
scales and zero points, so the codes are used as they are: no dequantizing, no second rounding.
With ``HWLM_CPU_INT4_BATCH_KERNEL=dynamic`` a 4-bit layer also gets the int8 twin that runs
its calls of many rows (``cpu_quant.TwinLinear``).
Anything else (other group sizes, fp8 weights, which have no ONNX Runtime CPU kernel) is
dequantized once into a float layer.

The graphs are cached on disk as ``cpu_quant_graph`` caches the load-time quantized ones, keyed
by a hash of the packed codes, scales, zero points and bias.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from hwlm.backend import DequantizedLinear, QuantizedLinear
from hwlm.models.quantized_weight import GroupQuantizedWeight, PrequantizedWeight

from .cpu_quant_pack import F32, U8, BlockQuantized


def prequantized_linear(weight: PrequantizedWeight, bias: torch.Tensor | None) -> QuantizedLinear:
    """The kernel of a dense layer stored quantized: MatMulNBits where the layout maps onto it,
    else the float weights (dequantized once)."""
    from .cpu_quant import _require_runtime

    if isinstance(weight, GroupQuantizedWeight) and runs_natively(weight):
        _require_runtime()
        from .cpu_quant import OrtLinear, with_batch_twin

        b = None if bias is None else bias.detach().to(torch.float32).contiguous().numpy()
        q = pack_group_quantized(weight)
        layer = OrtLinear(_cached(q, b), q.k, q.n)
        return layer if q.bits != 4 else with_batch_twin(layer, lambda: q, b, lambda: _key(q, b))
    return DequantizedLinear(weight.dequantize(), None if bias is None else bias.float())


def runs_natively(weight: GroupQuantizedWeight) -> bool:
    """Whether MatMulNBits takes this layout as it is (4 or 8 bits, groups of 2**i >= 16)."""
    size = weight.group_size
    return weight.bits in (4, 8) and size >= 16 and size & (size - 1) == 0


def pack_group_quantized(weight: GroupQuantizedWeight) -> BlockQuantized:
    """MatMulNBits' packed layout of ``weight``: codes, scales and zero points unchanged."""
    weight.check()
    n, k, size, bits = weight.out_features, weight.in_features, weight.group_size, weight.bits
    codes = weight.codes.to(torch.uint8).cpu().numpy().reshape(n, k // size, size)
    scales = weight.scales.to(torch.float32).cpu().numpy().reshape(n, k // size)
    zeros = None if weight.zeros is None else weight.zeros.to(torch.uint8).cpu().numpy()
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        zeros = None if zeros is None else _pack_nibbles(zeros)
    return BlockQuantized(
        bits, size, n, k, np.ascontiguousarray(codes), np.ascontiguousarray(scales), zeros
    )


def _pack_nibbles(values: U8) -> U8:
    """[N, m] uint8 < 16 -> [N, ceil(m / 2)], element ``2i`` in the low nibble."""
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return np.ascontiguousarray(values[:, 0::2] | (values[:, 1::2] << 4))


def _cached(q: BlockQuantized, bias: F32 | None) -> str | bytes:
    """The serialized graph of ``q`` (path of its cache file, or the bytes with no cache)."""
    from .cpu_quant_graph import build_graph, cached_file

    return cached_file(
        lambda: _key(q, bias), lambda: bytes(build_graph(q, bias).SerializeToString())
    )


def _key(q: BlockQuantized, bias: F32 | None) -> str:
    """The cache name of ``q`` and ``bias``: a hash of its codes, scales and zero points."""
    from .cpu_quant_graph import FORMAT_VERSION

    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"v{FORMAT_VERSION};pre;{q.bits};{q.block_size};{q.n};{q.k}".encode())
    for part in (q.packed, q.scales, q.zero_points, bias):
        digest.update(b"-" if part is None else np.ascontiguousarray(part).data)
    return digest.hexdigest()
