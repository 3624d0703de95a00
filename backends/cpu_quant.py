"""Quantized dense layers on the CPU: int8 and int4 weights through ONNX Runtime's kernels.

Each layer is one small ORT session over a one-node graph (``cpu_quant_graph``); the model's
fused projections (q/k/v, gate/up) are already one layer each, so a Llama decoder layer makes four
calls. A call costs about 7 us of overhead here (IOBinding on torch's own buffers, no copies):
a C1 decode step's 49 calls add about 0.35 ms to a 25 ms step.

- ``int4``: MatMulNBits, 4-bit codes in blocks of 128 inputs with a float scale each
  (symmetric, as llama.cpp's Q4_0), activations quantized per block to int8 at run time
  (accuracy_level 4). Blocks of 128 measured 1.2-2x faster than blocks of 32 here.
  ``HWLM_CPU_INT4_BATCH_KERNEL=dynamic`` gives each layer an int8 twin for calls of 8 rows or
  more (batches, prefills): DynamicQuantizeMatMul over the same 4-bit weights rounded to int8
  per output channel. On the Intel Xeon machine (AVX512-VNNI, AMX) ORT's int8 GEMM runs a
  768 x 4096 layer in 0.27 ms at 32 rows and 1.7 ms at 512 against 0.75 and 12.7 ms for
  MatMulNBits, which wins below 8 rows (0.12 against 0.19 ms at one). The price: a byte per
  weight beside the half byte of the codes, and the int8 kernel's one activation scale per call
  (as the ``int8`` method's) instead of MatMulNBits' one per row and block. On C1's shape the
  4-bit rounding dominates either way (KL to float32 0.0374 against 0.0368 nats over 512
  tokens), but against the exactly dequantized weights of the tiny AWQ test model top-1
  agreement fell from over 0.9 to 0.79, and real models' activation outliers make one scale a
  call worse still; so it is not the default.
- ``int8``: DynamicQuantizeMatMul, int8 codes with one scale per output channel; the activations
  are quantized to uint8 with one scale per call (the whole batch). Measured 2-3x faster than
  MatMulNBits 8-bit from 8 rows up on the development machine (AVX512-VNNI), level at one row.
  HWLM_CPU_INT8_KERNEL=nbits picks MatMulNBits 8-bit in blocks of 32 instead (one activation
  scale per row and block: outputs that do not depend on the rest of the batch).

Thread spinning is off in every session (ORT's pool spinning after each call would fight numba's
attention threads, which run right after it), and each session uses as many threads as torch
(``torch.get_num_threads()``), the same cores numba's kernels use; ORT and numba never run at the
same time.

``HWLM_CPU_ORT_POOL=shared`` gives every session ORT's one process-wide pool instead, whose
workers spin between calls (ORT's Python API cannot turn that pool's spinning off). For one
stream it saves the wake-up of a sleeping pool at each of a step's ~50 calls (int4 C1 decode step
8.4 against 11.1 ms on the 2-core development machine); in batches the spinning workers take the
cores from the numba and torch kernels between calls (32 sequences: 196-274 against 56 ms a
step), so it is for a single user only and not the default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch

from hwlm.backend import QuantizedLinear

from .cpu_quant_graph import (
    Quantized,
    cached_file,
    cached_graph,
    graph_key,
    read_graph,
    serialized_graph,
)
from .cpu_quant_pack import (
    F32,
    BlockQuantized,
    dequantize_blocks,
    dequantize_channels,
    quantize_blocks,
    quantize_channels,
)

logger = logging.getLogger(__name__)

INT4_BLOCK_SIZE = 128
INT8_NBITS_BLOCK_SIZE = 32  # as llama.cpp's Q8_0
INT8_KERNEL_ENV = "HWLM_CPU_INT8_KERNEL"
INT4_BATCH_ENV = "HWLM_CPU_INT4_BATCH_KERNEL"
INT4_BATCH_MIN_ROWS = 8  # from here the int8 twin is faster (module docstring)
POOL_ENV = "HWLM_CPU_ORT_POOL"
POOLS = ("session", "shared")
METHODS = ("int8", "int4")
Quantize = Callable[[F32], Quantized]


class OrtLinear:
    """``x W^T + b`` through an ORT session over a ``cpu_quant_graph`` model; any leading shape
    of float32 ``x``."""

    def __init__(self, source: str | bytes, in_features: int, out_features: int) -> None:
        import onnxruntime as ort

        self.source = source
        self.k, self.n = in_features, out_features
        self.session = ort.InferenceSession(
            source, session_options(), providers=["CPUExecutionProvider"]
        )
        self.binding = self.session.io_binding()
        self._bind_x, self._bind_y, self._run = _binding_calls(self.session, self.binding)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            return self(x.to(torch.float32).contiguous()).to(x.dtype)
        rows = x.numel() // self.k
        y = torch.empty((*x.shape[:-1], self.n), dtype=torch.float32)
        if rows:
            self._bind_x([rows, self.k], x.data_ptr())
            self._bind_y([rows, self.n], y.data_ptr())
            self._run()
        return y

    def dequantized_weight(self) -> torch.Tensor:
        import onnx

        if isinstance(self.source, bytes):
            model = onnx.load_from_string(self.source)
        else:
            model = onnx.load(self.source)
        q, _ = read_graph(model)
        if isinstance(q, BlockQuantized):
            return torch.from_numpy(dequantize_blocks(q))
        return torch.from_numpy(dequantize_channels(q))


class TwinLinear:
    """A 4-bit layer (``nbits``, MatMulNBits) with an int8 twin (``int8``, DynamicQuantizeMatMul
    over the same weights rounded to int8 per output channel) for calls of ``min_rows`` rows or
    more, where ORT's int8 GEMM is the faster kernel (module docstring)."""

    def __init__(self, nbits: OrtLinear, int8: OrtLinear, min_rows: int) -> None:
        self.nbits, self.int8, self.min_rows = nbits, int8, min_rows
        self.k, self.n = nbits.k, nbits.n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.k
        return (self.int8 if rows >= self.min_rows else self.nbits)(x)

    def dequantized_weight(self) -> torch.Tensor:
        """The 4-bit weights; the twin's differ by its int8 rounding of them."""
        return self.nbits.dequantized_weight()


ORT_LAYERS = (OrtLinear, TwinLinear)  # the kernels that run a whole layer in ORT


def with_batch_twin(
    layer: OrtLinear,
    blocks: Callable[[], BlockQuantized],
    bias: F32 | None,
    key: Callable[[], str],
) -> QuantizedLinear:
    """``layer`` (4-bit) with its int8 twin (``TwinLinear``) with
    ``HWLM_CPU_INT4_BATCH_KERNEL=dynamic``, else ``layer``. ``blocks()`` gives the layer's
    4-bit layout, called only to build the twin's graph; ``key()`` names that layout in the
    graph cache."""
    if int4_batch_kernel() == "nbits":
        return layer
    source = cached_file(
        lambda: f"{key()}-dq8twin",
        lambda: serialized_graph(quantize_channels(dequantize_blocks(blocks())), bias),
    )
    return TwinLinear(layer, OrtLinear(source, layer.k, layer.n), INT4_BATCH_MIN_ROWS)


def int4_batch_kernel() -> str:
    """``HWLM_CPU_INT4_BATCH_KERNEL``: ``nbits`` (default: MatMulNBits for every call) or
    ``dynamic`` (the int8 twin for calls of many rows)."""
    return env_choice(INT4_BATCH_ENV, ("nbits", "dynamic"))


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The setting of environment variable ``name``, one of ``choices`` (the first when unset
    or empty); otherwise a one-line ValueError naming the variable and the choices."""
    value = os.environ.get(name, "").strip() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


BindCall = Callable[[list[int], int], None]


def _binding_calls(session: Any, binding: Any) -> tuple[BindCall, BindCall, Callable[[], None]]:
    """(bind x, bind y, run) for one layer's call. A decode step makes ~50 calls, and ORT's Python
    wrappers of these three cost ~10 us per call here (a device object built per bind, checks
    for graph capture per run), more than a small layer's product: where the package exposes
    its native binding objects they are called directly, with the device made once."""
    import onnxruntime as ort

    try:
        native, native_session = binding._iobinding, session._sess
        device = ort.OrtDevice.make("cpu", 0)._get_c_device()
        bind = native.bind_input, native.bind_output
    except AttributeError:  # another onnxruntime version: its public API
        return (
            lambda shape, ptr: binding.bind_input("x", "cpu", 0, np.float32, shape, ptr),
            lambda shape, ptr: binding.bind_output("y", "cpu", 0, np.float32, shape, ptr),
            lambda: session.run_with_iobinding(binding),
        )
    return (
        lambda shape, ptr: bind[0]("x", device, np.float32, shape, ptr),
        lambda shape, ptr: bind[1]("y", device, np.float32, shape, ptr),
        lambda: native_session.run_with_iobinding(native, None),
    )


def quantized_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, method: str
) -> QuantizedLinear:
    """The ORT kernel of a dense layer with float ``weight`` [out, in] quantized by ``method``."""
    if method not in METHODS:
        raise ValueError(f"cpu backend: unknown quantization {method!r}; expected one of {METHODS}")
    _require_runtime()
    w = weight.detach().to(torch.float32).contiguous().numpy()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous().numpy()
    settings, quantize = _scheme(method)
    source = cached_graph(w, b, settings, quantize)
    n, k = w.shape
    layer = OrtLinear(source, k, n)
    if method != "int4":
        return layer

    def blocks() -> BlockQuantized:
        q = quantize(w)
        assert isinstance(q, BlockQuantized)
        return q

    return with_batch_twin(layer, blocks, b, lambda: graph_key(w, b, settings))


def _scheme(method: str) -> tuple[str, Quantize]:
    """(settings string for the cache key, weight -> quantized layout) of ``method``."""
    if method == "int4":
        return f"nbits4-b{INT4_BLOCK_SIZE}-sym", _blocks(4, INT4_BLOCK_SIZE)
    if env_choice(INT8_KERNEL_ENV, ("dynamic", "nbits")) == "nbits":
        return f"nbits8-b{INT8_NBITS_BLOCK_SIZE}-sym", _blocks(8, INT8_NBITS_BLOCK_SIZE)
    return "dq8-channel-sym", quantize_channels


def _blocks(bits: int, block_size: int) -> Quantize:
    def quantize(w: F32) -> Quantized:
        return quantize_blocks(w, bits, block_size)

    return quantize


def session_options() -> Any:
    """One thread pool per session, as many threads as torch uses, no spinning; or, with
    ``HWLM_CPU_ORT_POOL=shared``, ORT's process-wide pool (whose workers spin)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if ort_pool() == "shared" and _shared_pool():
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT warns about unused optional inputs
    return options


def ort_pool() -> str:
    """The sessions' thread pool from ``HWLM_CPU_ORT_POOL``: ``session`` (default) or ``shared``."""
    return env_choice(POOL_ENV, POOLS)


@cache
def _shared_pool() -> bool:
    """Create ORT's process-wide thread pool (once, before its environment exists)."""
    import onnxruntime as ort

    try:
        ort.set_global_thread_pool_sizes(torch.get_num_threads(), 1)
    except Exception as err:  # the environment exists already: sessions keep their own pools
        logger.warning("onnxruntime's shared thread pool is unavailable (%s)", err)
        return False
    return True


@cache
def _require_runtime() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"quantization on the cpu backend needs onnxruntime and onnx ({err}); "
            "install them with: pip install 'hwlm[cpu-quant]'"
        ) from None
