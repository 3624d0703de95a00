"""Copies between the host and the device, as the backend says they should be made.

With overlapped steps (see ``hwlm.engine.llm_engine``) no copy may make the host wait for the
device: ``torch.tensor(values, device=cuda)`` would block until every kernel already queued had
run, stalling the host on the previous step's forward. How to avoid that is device policy, so it
belongs to the backend (``Backend.upload`` and ``Backend.start_host_copy``); this module holds
the contracts, the portable implementations and the pinned-memory ones accelerators can share.

The sampling code only sees tensors, so it sends host-built values through ``to_device``, which
uses the ``Transfers`` made active by ``using`` (the ``Sampler`` makes its backend's active while
it samples) and a plain copy otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import numpy as np
import torch


class HostCopy(Protocol):
    """A device-to-host copy under way."""

    def wait(self) -> list[torch.Tensor]:
        """The copied tensors, on the host, once the copy has completed."""
        ...


class Transfers(Protocol):
    """How tensors move between the host and ``device`` (``hwlm.backend.Backend`` answers it)."""

    device: torch.device

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` on ``device``."""
        ...

    def start_host_copy(self, tensors: list[torch.Tensor]) -> HostCopy:
        """Start copying ``tensors`` to the host."""
        ...

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor that ``upload`` sends without copying it first."""
        ...


class CopyAtWait:
    """The portable ``HostCopy``: nothing happens before ``wait``, which copies synchronously
    (for tensors already on the host, it returns them as they are)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._tensors = tensors

    def wait(self) -> list[torch.Tensor]:
        return [t.cpu() for t in self._tensors]


class PinnedHostCopy:
    """Copies into pinned host buffers, queued behind the device's work on the current stream,
    and a device event recorded after them: the host waits only in ``wait``."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(self._host, tensors, strict=True):
            h.copy_(t, non_blocking=True)
        self._ready = torch.Event(device)
        self._ready.record()

    def wait(self) -> list[torch.Tensor]:
        self._ready.synchronize()
        return self._host


def pinned_upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` through pinned memory: the copy is queued, the host does not wait.
    A tensor already in pinned memory (``pinned_buffer``) is sent as it is."""
    pinned = host if host.is_pinned() else host.pin_memory()
    return pinned.to(device, non_blocking=True)


def pinned_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in pinned host memory (from torch's caching host allocator, which
    reuses a block only once the copies queued from it have run)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


_active: ContextVar[Transfers | None] = ContextVar("hwlm_transfers", default=None)


@contextmanager
def using(transfers: Transfers) -> Iterator[None]:
    """Within the block (in this thread or task), ``to_device`` uploads through ``transfers``."""
    token = _active.set(transfers)
    try:
        yield
    finally:
        _active.reset(token)


def to_device(
    values: SequenceABC[Any] | np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``values`` (a list or array) as a 1-D or 2-D tensor on ``device``: through the active
    ``Transfers``' upload when it serves ``device``, else by a plain copy."""
    host = torch.as_tensor(values, dtype=dtype)
    active = _active.get()
    if active is not None and active.device == device:
        return active.upload(host)
    return host.to(device)
