"""Random access to the tensors of a checkpoint's files, by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointTensors:
    """The tensors of ``files`` (``*.safetensors`` read lazily, ``*.bin`` memory-mapped)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        self.names: list[str] = []
        for file in files:
            if file.suffix == ".safetensors":
                handle: Any = safe_open(str(file), framework="pt", device="cpu")
                keys = list(handle.keys())
            else:
                handle = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                keys = list(handle)
            for key in keys:
                self._where[key] = handle
            self.names.extend(keys)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        handle = self._where[name]
        tensor: torch.Tensor = (
            handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
        )
        return tensor
