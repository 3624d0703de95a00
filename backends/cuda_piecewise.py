"""CUDA graphs of prefill and mixed steps, recorded in pieces around attention.

An eager step of a small model is bound by the host: a mixed step of the Qwen2.5-0.5B shape
(one 64-token prompt beside running decodes) makes ~1,000 kernel launches through ~400 torch
ops, ~12 ms of host time on the H200 machine against ~1 ms of GPU time. Attention cannot be
captured whole for such steps (its launch depends on the step's query lengths), but everything
between two attention layers depends only on the token count. So, for each padded token count
up to a limit, the forward is recorded as one graph per stretch between attention layers
(vLLM's piecewise graphs); a replay runs graph, attention (eager, with the step's metadata),
graph, ... The engine already pads an eager step's tokens to one of the backend's sizes
(``eager_token_buckets``), so every step up to the limit replays.

Recording: the model runs once with ``ForwardContext.pieces`` set. Each attention layer then
calls ``split``, which copies q/k/v into buffers shared by all layers (inside the graph being
recorded), ends that graph, runs the attention eagerly so the model sees an output of the right
shape, copies it into a shared output buffer and begins the next graph, which reads that
buffer. Every piece of every size shares one memory pool, recorded and replayed in the same
order, so a tensor a piece leaves for a later one (the residual stream, rotary tables) stays
valid between them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from hwlm.attention import AttentionLayer, AttentionMetadata, ForwardContext
from hwlm.backend import Backend

logger = logging.getLogger(__name__)


@dataclass
class _Pieces:
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    layers: list[AttentionLayer] = field(default_factory=list)  # after graphs[i], i < len
    hidden: torch.Tensor | None = None  # the last graph's output


class PiecewiseGraphs:
    """Implements ``hwlm.backend.StepRunner`` for the token counts in ``sizes``."""

    def __init__(
        self,
        model: nn.Module,
        backend: Backend,
        kv_caches: list[torch.Tensor],
        sizes: tuple[int, ...],
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes)
        n, device = self.sizes[-1], backend.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.pieces: dict[int, _Pieces] = {}
        # Shared by every layer and size, allocated at the first split (their shapes come from
        # the model): q/k/v as the graphs leave them, and attention's output as they read it.
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self._recording: _Pieces | None = None
        self._size = 0
        self._ctx: ForwardContext | None = None
        self._pool: Any = None  # torch's graph pool handle
        self._stream: torch.cuda.Stream | None = None

    def capture(self) -> PiecewiseGraphs:
        start = time.perf_counter()
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(self.backend.device)  # type: ignore[no-untyped-call]
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: later ones reuse its memory
                self._capture(size)
        torch.cuda.synchronize(self.backend.device)
        count = sum(len(p.graphs) for p in self.pieces.values())
        logger.info(
            "captured %d piecewise CUDA graphs for %d step sizes (%d..%d tokens) in %.1f s",
            count,
            len(self.sizes),
            self.sizes[0],
            self.sizes[-1],
            time.perf_counter() - start,
        )
        return self

    def fits(self, num_tokens: int) -> bool:
        return num_tokens in self.pieces

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        size = input_ids.shape[0]
        pieces = self.pieces[size]
        self.input_ids[:size].copy_(input_ids)
        self.positions[:size].copy_(positions)
        ctx = ForwardContext(self.backend, self.kv_caches, metadata)
        for graph, layer in zip(pieces.graphs, pieces.layers, strict=False):
            graph.replay()
            self._attend(layer, size, ctx)
        pieces.graphs[-1].replay()
        assert pieces.hidden is not None
        return pieces.hidden

    def split(
        self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """``ForwardContext.pieces``' hook, called by each attention layer while recording."""
        recording, size = self._recording, self._size
        assert recording is not None
        if self.q is None:
            n = self.sizes[-1]
            self.q = q.new_empty((n, *q.shape[1:]))
            self.k = k.new_empty((n, *k.shape[1:]))
            self.v = v.new_empty((n, *v.shape[1:]))
        assert self.k is not None and self.v is not None
        self.q[:size].copy_(q)
        self.k[:size].copy_(k)
        self.v[:size].copy_(v)
        recording.graphs[-1].capture_end()
        recording.layers.append(layer)
        assert self._ctx is not None
        out = self._attend(layer, size, self._ctx)
        self._begin(recording)
        return out

    def _attend(self, layer: AttentionLayer, size: int, ctx: ForwardContext) -> torch.Tensor:
        assert self.q is not None and self.k is not None and self.v is not None
        out = layer.attend(self.q[:size], self.k[:size], self.v[:size], ctx)
        if self.out is None:
            self.out = out.new_empty((self.sizes[-1], *out.shape[1:]))
        self.out[:size].copy_(out)
        return self.out[:size]

    def _capture(self, size: int) -> None:
        ctx = self._capture_context(size)
        ids, pos = self.input_ids[:size], self.positions[:size]
        self.model(ids, pos, ctx)  # warm-up: compiles kernels, settles the allocator
        torch.cuda.synchronize(self.backend.device)
        recording = _Pieces()
        self._recording, self._size, self._ctx = recording, size, ctx
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            self._begin(recording)
            recording.hidden = self.model(ids, pos, replace(ctx, pieces=self))
            recording.graphs[-1].capture_end()
        self._recording = self._ctx = None
        self.pieces[size] = recording

    def _begin(self, recording: _Pieces) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self._pool)
        recording.graphs.append(graph)

    def _capture_context(self, size: int) -> ForwardContext:
        """Metadata for recording: ``size`` one-token sequences that write no KV (slot -1) and
        read block 0. The attention this runs is not recorded; only its output's shape is used."""
        device = self.backend.device
        metadata = AttentionMetadata(
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=device),
            seq_lens=torch.ones(size, dtype=torch.int32, device=device),
            block_tables=torch.zeros((size, 1), dtype=torch.int32, device=device),
            slot_mapping=torch.full((size,), -1, dtype=torch.int64, device=device),
            max_query_len=1,
            max_seq_len=1,
        )
        return ForwardContext(self.backend, self.kv_caches, metadata)
