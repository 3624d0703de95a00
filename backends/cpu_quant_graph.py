"""One-node ONNX graphs for the quantized dense layers, and their on-disk cache.

Each graph is ``y[m, N] = x[m, K] W^T + b`` through one com.microsoft kernel of ONNX Runtime:
MatMulNBits for ``BlockQuantized`` weights, DynamicQuantizeMatMul for ``ChannelQuantized`` ones.
The weights are initializers, so a graph file is the whole quantized layer; files are cached
under a hash of the float weights and the settings (``cached_graph``), and a later load of the
same weights skips quantizing and packing.

The cache lives in ``$HWLM_QUANT_CACHE`` (default ``~/.cache/hwlm/quantized``); ``off`` keeps the
graphs in memory only. Delete the folder to clear it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .cpu_quant_pack import F32, BlockQuantized, ChannelQuantized

logger = logging.getLogger(__name__)

CACHE_ENV = "HWLM_QUANT_CACHE"
# Bumped whenever the packing or graphs change, so that older cache files are not reused.
FORMAT_VERSION = 1
# MatMulNBits' accuracy_level 4: activations quantized to int8 per block, int8 dot products.
ACCURACY_LEVEL = 4
_OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]

Quantized = BlockQuantized | ChannelQuantized


def build_graph(q: Quantized, bias: F32 | None) -> onnx.ModelProto:
    """The one-node model for ``q`` (plus ``bias`` [N]); input ``x``, output ``y``."""
    if isinstance(q, BlockQuantized):
        n, k = q.n, q.k
        inits = [_tensor(q.packed, "B"), _tensor(q.scales.reshape(-1), "scales")]
        inputs = ["x", "B", "scales", "", "", ""]  # zero_points, g_idx, bias
        if q.zero_points is not None:
            inits.append(_tensor(q.zero_points.reshape(-1), "zero_points"))
            inputs[3] = "zero_points"
        attrs: dict[str, Any] = dict(
            K=k, N=n, bits=q.bits, block_size=q.block_size, accuracy_level=ACCURACY_LEVEL
        )
        op = "MatMulNBits"
    else:
        k, n = q.codes.shape
        zero = np.zeros(n, dtype=np.int8)
        inits = [_tensor(q.codes, "B"), _tensor(q.scales, "scales"), _tensor(zero, "zero_points")]
        inputs, attrs = ["x", "B", "scales", "zero_points", ""], {}
        op = "DynamicQuantizeMatMul"
    if bias is not None:
        inits.append(_tensor(bias.astype(np.float32), "bias"))
        inputs[-1] = "bias"
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "hwlm_quantized_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=_OPSETS)


def read_graph(model: onnx.ModelProto) -> tuple[Quantized, F32 | None]:
    """The weights and bias of a graph ``build_graph`` made (from a cache file)."""
    (node,) = model.graph.node
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bias = arrays.get("bias")
    if node.op_type == "DynamicQuantizeMatMul":
        return ChannelQuantized(arrays["B"], arrays["scales"]), bias
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k_blocks = arrays["B"].shape[:2]
    zero = arrays.get("zero_points")
    q = BlockQuantized(
        int(attrs["bits"]),
        int(attrs["block_size"]),
        int(attrs["N"]),
        int(attrs["K"]),
        arrays["B"],
        arrays["scales"].reshape(n, k_blocks),
        None if zero is None else zero.reshape(n, -1),
    )
    return q, bias


def cached_graph(
    weight: F32, bias: F32 | None, settings: str, quantize: Callable[[F32], Quantized]
) -> str | bytes:
    """A graph file's path for ``weight`` (and ``bias``) quantized by ``quantize`` under
    ``settings`` (a string naming the method and its parameters): read from the cache, or built
    and written there. The serialized model itself when the cache is off or not writable."""
    return cached_file(
        lambda: graph_key(weight, bias, settings), lambda: serialized_graph(quantize(weight), bias)
    )


def cached_file(key: Callable[[], str], build: Callable[[], bytes]) -> str | bytes:
    """The cache file named by ``key()`` (computed only with the cache on): read if it is
    there, else ``build()`` written there; ``build()``'s bytes when the cache is off or not
    writable."""
    folder = cache_dir()
    if folder is None:
        return build()
    path = folder / f"{key()}.onnx"
    if path.is_file():
        return str(path)
    data = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
            f.write(data)
        os.replace(f.name, path)  # atomic: concurrent loaders never read half a file
    except OSError as err:
        logger.warning("cannot write the quantized-weights cache in %s (%s)", folder, err)
        return data
    return str(path)


def cache_dir() -> Path | None:
    """Where graphs are cached; None when ``$HWLM_QUANT_CACHE`` is ``off``."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "hwlm" / "quantized"


def graph_key(weight: F32, bias: F32 | None, settings: str) -> str:
    """The cache name of ``weight`` and ``bias`` quantized under ``settings``."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"v{FORMAT_VERSION};{settings};{weight.shape};{bias is not None}".encode())
    digest.update(np.ascontiguousarray(weight).data)
    if bias is not None:
        digest.update(np.ascontiguousarray(bias).data)
    return digest.hexdigest()


def serialized_graph(q: Quantized, bias: F32 | None) -> bytes:
    data: bytes = build_graph(q, bias).SerializeToString()
    return data


def _tensor(array: np.ndarray, name: str) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)
