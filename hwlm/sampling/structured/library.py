"""The grammar library (llguidance), imported on first use with a clear error when missing, and
its pool of host threads.

hwlm imports it only when a request asks for structured outputs, so engines that never see one
neither need it installed nor pay for its import."""

from __future__ import annotations

import os
import threading
from types import ModuleType
from typing import Any

from hwlm.sampling_params import ParameterError

INSTALL_HINT = "pip install 'hwlm[structured]'"
THREADS_ENV = "HWLM_GRAMMAR_THREADS"

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
    that fills masks and advances matchers in parallel, with the GIL released;
    ``HWLM_GRAMMAR_THREADS`` threads, or llguidance's default (80% of the CPUs, up to 32). One
    pool serves every engine of the process, so they never oversubscribe the cores."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance().LLExecutor(grammar_threads())
        return _executor


def grammar_threads() -> int | None:
    """``HWLM_GRAMMAR_THREADS`` (a positive count), or None when unset."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive thread count, got {text!r}")
    return int(text)
