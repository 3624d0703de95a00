"""What one engine step tells the attention layers: built once per step, passed explicitly.

Tokens of all scheduled sequences are flattened into one batch. Sequence ``i`` owns query tokens
``query_start_loc[i]:query_start_loc[i+1]``; these are the *last* ``query_len`` tokens of its
context of ``seq_lens[i]`` tokens, so query token ``j`` sits at position
``seq_lens[i] - query_len + j`` and attends to keys ``0 ..`` that position (causal). The same
layout covers a prefill (no cached prefix), a chunk of a prefill over cached prefix blocks, and a
decode (query_len 1), mixed freely in one batch.

The paged KV cache of one layer is a tensor ``[2, num_blocks, block_size, num_kv_heads,
head_size]`` (index 0 = keys, 1 = values). Token ``t`` of sequence ``i`` lives in block
``block_tables[i, t // block_size]`` at offset ``t % block_size``; ``slot_mapping`` gives each new
token's flat slot ``block * block_size + offset`` (or -1: write nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from hwlm.backend import Backend


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs], context length including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], unused entries are 0
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def to(self, device: torch.device) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc.to(device, non_blocking=True),
            seq_lens=self.seq_lens.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
        )


@dataclass
class ForwardContext:
    """Everything a model's attention layers need for one forward pass."""

    backend: Backend
    kv_caches: list[torch.Tensor]  # one per layer, layout above
    metadata: AttentionMetadata
    # Set while a backend records the forward in pieces around attention (CUDA graphs of
    # mixed steps): each attention layer hands its inputs over instead of attending.
    pieces: AttentionSplit | None = None


class AttentionSplit(Protocol):
    def split(
        self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """What ``layer.attend(q, k, v, ctx)`` returns, as the next piece will read it."""
        ...


class AttentionLayer(Protocol):
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Store the step's keys/values, then attend: [n, heads * d]."""
        ...
