"""Weight quantization at load time: every dense layer, and the LM head, handed to the backend's
quantized kernel (``Backend.quantized_linear``). Platform-neutral: how the weights are packed and
multiplied is the backend's business (the cpu backend: ONNX Runtime, ``backends/cpu_quant.py``).

What stays float: embeddings (a lookup, not a product), norms, rotary tables, the KV cache and
attention. A tied LM head is quantized as a copy; the embedding table keeps its float weights.
"""

from __future__ import annotations

import logging
import time

from hwlm.backend import Backend, unsupported_quantization
from hwlm.engine_args import QUANTIZATIONS
from hwlm.models import CausalLM
from hwlm.models.layers import Linear, release

logger = logging.getLogger(__name__)


def check_quantization(method: str | None, backend: Backend) -> None:
    """ValueError (one line) when ``method`` is unknown or ``backend`` cannot run it."""
    if method is None:
        return
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; expected one of {QUANTIZATIONS}")
    if method not in backend.quantizations:
        raise ValueError(unsupported_quantization(backend.name, method, backend.quantizations))


def quantize_model(model: CausalLM, backend: Backend, method: str) -> int:
    """Quantize every ``Linear`` of ``model`` and its LM head with ``method`` on ``backend``;
    returns how many dense layers were quantized."""
    check_quantization(method, backend)
    start = time.perf_counter()
    lm_head = model.lm_head
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module is not lm_head:
            module.quantize(backend, method)
            count += 1
    model.logits_kernel = backend.quantized_linear(lm_head.weight.detach(), None, method)
    if isinstance(lm_head, Linear):  # untied: the head's float weights have no other user
        lm_head.quantization = method
        release(lm_head.weight)
    logger.info(
        "quantized %d dense layers and the LM head to %s in %.1f s",
        count,
        method,
        time.perf_counter() - start,
    )
    return count + 1
