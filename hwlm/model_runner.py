"""Turns a scheduled batch into model inputs, runs the forward pass and samples.

How a layer's dense part executes is the model's business (torch modules today); the runner only
builds the flattened inputs and the step's AttentionMetadata, which it passes down explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hwlm.attention import AttentionMetadata, ForwardContext
from hwlm.backend import Backend, DecodeRunner
from hwlm.config import EngineConfig
from hwlm.models import CausalLM
from hwlm.prompt_logprobs import record_prompt_logprobs
from hwlm.sampler import Sampler, SamplerOutput
from hwlm.scheduler import ScheduledBatch
from hwlm.sequence import Sequence


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # int64: the row of each sampling sequence's last token
    sample_seqs: list[Sequence]  # sequences whose chunk reaches their last token


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        backend: Backend,
        kv_caches: list[torch.Tensor],
        config: EngineConfig,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = config.block_size
        self.sampler = Sampler()
        backend.prepare_model(model)
        self.decode_runner: DecodeRunner | None = None
        if not config.enforce_eager:
            self.decode_runner = backend.capture_decode(
                model, kv_caches, config.max_num_seqs, config.max_model_len
            )

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; returns the sequences that got a new token and what was sampled."""
        if batch.copies:
            self.backend.copy_blocks(self.kv_caches, batch.copies)
        inputs = self.prepare(batch)
        with torch.inference_mode():
            hidden = self._forward(inputs)
            if any(s.wants_prompt_logprobs for s in batch.seqs):
                record_prompt_logprobs(batch, hidden, self.model.compute_logits)
            if not inputs.sample_seqs:
                return [], None
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            return inputs.sample_seqs, self.sampler(logits, inputs.sample_seqs)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        metadata = inputs.metadata
        runner = self.decode_runner
        if runner is not None and metadata.max_query_len == 1 and runner.fits(metadata.num_seqs):
            return runner.run(inputs.input_ids, inputs.positions, metadata)
        ctx = ForwardContext(self.backend, self.kv_caches, metadata)
        return self.model(inputs.input_ids, inputs.positions, ctx)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        num_seqs = len(batch.seqs)
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        query_start[1:] = np.cumsum(batch.num_new_tokens)
        seq_lens = np.empty(num_seqs, dtype=np.int32)
        max_blocks = max(len(s.block_ids) for s in batch.seqs)
        block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        input_ids: list[int] = []
        positions = np.empty(int(query_start[-1]), dtype=np.int64)
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            positions[query_start[i] : query_start[i + 1]] = np.arange(start, start + n)
            seq_lens[i] = start + n
            block_tables[i, : len(seq.block_ids)] = seq.block_ids
            if start + n == seq.num_tokens:
                sample_rows.append(int(query_start[i + 1]) - 1)
                sample_seqs.append(seq)
        token_seq = np.repeat(np.arange(num_seqs), batch.num_new_tokens)
        slots = block_tables[token_seq, positions // bs].astype(np.int64) * bs + positions % bs
        device = self.backend.device
        metadata = AttentionMetadata(
            query_start_loc=torch.from_numpy(query_start.astype(np.int32)),
            seq_lens=torch.from_numpy(seq_lens),
            block_tables=torch.from_numpy(block_tables),
            slot_mapping=torch.from_numpy(slots),
            max_query_len=int(max(batch.num_new_tokens)),
            max_seq_len=int(seq_lens.max()),
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
            positions=torch.from_numpy(positions).to(device),
            metadata=metadata.to(device) if device.type != "cpu" else metadata,
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=device),
            sample_seqs=sample_seqs,
        )
