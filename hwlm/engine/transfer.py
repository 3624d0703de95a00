"""Host-to-device copies that never wait for the device.

``torch.tensor(values, device=cuda)`` copies synchronously: the host blocks until every kernel
already queued on the stream has run. With overlapped steps (see ``hwlm.engine.llm_engine``) that would stall
the host on the previous step's forward, so host-built tensors go through pinned memory instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def to_device(
    values: Sequence[Any] | np.ndarray, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``values`` (a list or array) as a 1-D or 2-D tensor on ``device``, copied asynchronously."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
