"""The grammar library (llguidance), imported on first use with a clear error when missing, and
its pool of host threads.

hwlm imports it only when a request asks for structured outputs, so engines that never see one
neither need it installed nor pay for its import."""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

from hwlm.sampling_params import ParameterError

INSTALL_HINT = "pip install 'hwlm[structured]'"

_executor: Any = None
_executor_lock = threading.Lock()


def llguidance() -> ModuleType:
    """The ``llguidance`` module; ParameterError (``structured_outputs``) when not installed."""
    try:
        import llguidance as module
        import llguidance.hf  # noqa: F401  (the Hugging Face tokenizer adapter)
    except ImportError as exc:
        raise ParameterError(
            f"structured outputs need the llguidance package ({INSTALL_HINT}): {exc}",
            "structured_outputs",
        ) from exc
    return module


def executor() -> Any:
    """The process's ``llguidance.LLExecutor`` (created on first use): a pool of host threads
    (80% of the CPUs, up to 32) that fills masks and advances matchers in parallel, with the GIL
    released. One pool serves every engine of the process, so they never oversubscribe the
    cores."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance().LLExecutor()
        return _executor
