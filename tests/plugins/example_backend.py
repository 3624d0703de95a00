"""A minimal plugin backend, as a third party would write one, plus deliberately wrong variants
that the conformance suite must catch.

``ExampleBackend`` implements the interface in a few lines of vectorised torch. The wrong ones
each break one contract: attention that ignores the block table, a write_kv that writes next to
its slots, and a plugin written for another interface version. ``AcceleratorLike`` answers the
device-policy members as an accelerator would (``tests/test_backend_policy.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from hwlm.attention import AttentionMetadata
from hwlm.backend import Backend, ProbeResult
from hwlm.engine.transfer import HostCopy
from hwlm.kernels import reference


class ExampleBackend(Backend):
    name = "example"
    supported_dtypes = (torch.float32, torch.float16, torch.bfloat16)

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(True, 5, "example plugin: pure torch on the CPU")

    def memory_budget(self, memory_utilization: float) -> int:
        return int(memory_utilization * (256 << 20))

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
        keep = slot_mapping >= 0
        flat[0, slot_mapping[keep]] = key[keep]
        flat[1, slot_mapping[keep]] = value[keep]

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        out: torch.Tensor = reference.paged_attention(
            query.float(), kv_cache.float(), metadata, scale
        )
        return out.to(query.dtype)

    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        reference.copy_blocks(kv_caches, pairs)


class IgnoresBlockTable(ExampleBackend):
    """Wrong: reads each sequence's keys from blocks 0, 1, 2, ... instead of its block table."""

    name = "example-no-block-table"

    def attention(self, query, kv_cache, metadata, scale):  # type: ignore[no-untyped-def]
        table = torch.arange(metadata.block_tables.shape[1], dtype=torch.int32)
        wrong = AttentionMetadata(
            query_start_loc=metadata.query_start_loc,
            seq_lens=metadata.seq_lens,
            block_tables=table.expand_as(metadata.block_tables).contiguous(),
            slot_mapping=metadata.slot_mapping,
            max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len,
        )
        return super().attention(query, kv_cache, wrong, scale)


class WritesOutsideSlots(ExampleBackend):
    """Wrong: also writes each key/value into the slot after its own."""

    name = "example-bad-write"

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:  # type: ignore[no-untyped-def]
        super().write_kv(key, value, kv_cache, slot_mapping)
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        shifted = torch.where(slot_mapping >= 0, (slot_mapping + 1) % num_slots, slot_mapping)
        super().write_kv(key, value, kv_cache, shifted)


class OldInterface(ExampleBackend):
    """Built for an interface version hwlm does not have."""

    name = "example-old"
    interface_version = 0


class AcceleratorLike(ExampleBackend):
    """Answers the device-policy members unlike the CPU, as a plugin for an accelerator would:
    overlapped steps, a warm-up step as large as the scheduler allows before the memory budget,
    its own default token budgets. Its device is still the CPU, so its copies are the default
    ones, but it counts them, and records the tokens of every attention call (one per layer)."""

    name = "example-accelerator"
    overlap_steps = True
    profile_memory_with_warm_up = True
    TOKEN_BUDGETS: ClassVar[dict[bool, int]] = {True: 96, False: 40}  # offline: budget

    def __init__(self) -> None:
        super().__init__()
        self.uploads = 0
        self.host_copies = 0
        self.attention_tokens: list[int] = []
        self.tokens_before_budget: list[int] | None = None

    def default_max_num_batched_tokens(self, offline: bool) -> int:
        return self.TOKEN_BUDGETS[offline]

    def memory_budget(self, memory_utilization: float) -> int:
        self.tokens_before_budget = list(self.attention_tokens)
        return super().memory_budget(memory_utilization)

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        self.attention_tokens.append(query.shape[0])
        return super().attention(query, kv_cache, metadata, scale)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        self.uploads += 1
        return super().upload(host)

    def start_host_copy(self, tensors: list[torch.Tensor]) -> HostCopy:
        self.host_copies += 1
        return super().start_host_copy(tensors)


ENTRY_POINTS = {
    "example": "tests.plugins.example_backend:ExampleBackend",
    "example-no-block-table": "tests.plugins.example_backend:IgnoresBlockTable",
    "example-bad-write": "tests.plugins.example_backend:WritesOutsideSlots",
    "example-old": "tests.plugins.example_backend:OldInterface",
    "example-accelerator": "tests.plugins.example_backend:AcceleratorLike",
    "cpu-replay": "tests.plugins.replay_backend:ReplayingCPUBackend",
}


def install_entry_points(site: str) -> None:
    """Register the plugins as an installed distribution would: a .dist-info folder in ``site``
    (a directory on sys.path) with an entry_points.txt for the group ``hwlm.backends``."""
    import pathlib

    info = pathlib.Path(site) / "hwlm_example_backend-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hwlm-example-backend\nVersion: 1.0\n"
    )
    lines = ["[hwlm.backends]"] + [f"{name} = {target}" for name, target in ENTRY_POINTS.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
