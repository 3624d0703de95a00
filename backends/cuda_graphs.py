"""CUDA graphs of the model's forward for decode steps, replayed with the batch padded up.

A decode step launches a few hundred small kernels (a 32-layer Llama: about 20 per layer); eager,
the host needs ~3-5 ms to enqueue them, longer than the GPU needs to run a small model's step.
Captured once per padded batch size, a step costs one graph launch.

What makes replay valid: every input lives in a static buffer that the graph reads at replay
(token ids, positions, slots, context lengths, query starts, block tables), and no launch depends
on values (the attention launch depends only on the batch size and ``max_model_len``; see
``choose_launch``). Padding rows have no query tokens (their query range is empty) and write no
KV (slot -1); their hidden rows are garbage that no one reads, since every op is row-wise.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from hwlm.attention import AttentionMetadata, ForwardContext
from hwlm.backend import Backend

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 16, up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class PaddedDecodeRunner:
    """Implements ``hwlm.backend.DecodeRunner`` over static input buffers: a step's inputs are
    copied in, padded up to the next captured batch size, and that size's forward is replayed
    (``_replay``). Subclasses say how a size is recorded and replayed."""

    def __init__(
        self,
        model: nn.Module,
        backend: Backend,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        block_size = kv_caches[0].shape[2]
        max_blocks = -(-max_model_len // block_size)
        device = backend.device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)

    def _forward(self, size: int) -> torch.Tensor:
        metadata = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
        ctx = ForwardContext(self.backend, self.kv_caches, metadata)
        hidden: torch.Tensor = self.model(self.input_ids[:size], self.positions[:size], ctx)
        return hidden

    def _replay(self, size: int) -> torch.Tensor:
        """The forward of the first ``size`` rows of the static buffers."""
        raise NotImplementedError

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(metadata.seq_lens)
        self.seq_lens[n:size].fill_(0)
        self.query_start_loc[: n + 1].copy_(metadata.query_start_loc)
        self.query_start_loc[n + 1 : size + 1].fill_(n)  # padding rows: empty query ranges
        width = metadata.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(metadata.block_tables)
        return self._replay(size)[:n]


class DecodeGraphs(PaddedDecodeRunner):
    """One CUDA graph per captured batch size.

    Under tensor parallelism every rank captures its own graphs, in the same order (largest
    first), and a step replays the same size on every rank: the all-reduces and gathers of the
    forward are recorded into each rank's graph (NCCL supports capture) and pair up at replay
    as they do eagerly."""

    def __init__(
        self,
        model: nn.Module,
        backend: Backend,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
    ) -> None:
        super().__init__(model, backend, kv_caches, max_num_seqs, max_model_len)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def capture(self) -> DecodeGraphs:
        start = time.perf_counter()
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: later ones reuse its memory
                graph = torch.cuda.CUDAGraph()
                self._forward(size)  # warm-up: compiles kernels, settles the allocator
                torch.cuda.synchronize(self.backend.device)
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self._forward(size)
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.synchronize(self.backend.device)
        logger.info(
            "captured decode CUDA graphs for %d batch sizes (1..%d) in %.1f s",
            len(self.sizes),
            self.sizes[-1],
            time.perf_counter() - start,
        )
        return self

    def _replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]
