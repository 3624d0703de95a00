"""Turns a scheduled batch into model inputs, runs the forward pass and samples.

How a layer's dense part executes is the model's business (torch modules today); the runner only
builds the flattened inputs and the step's AttentionMetadata, which it passes down explicitly.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hwlm.attention import AttentionMetadata, ForwardContext
from hwlm.backend import Backend, DecodeRunner, StepRunner
from hwlm.config import EngineConfig
from hwlm.engine.scheduler import ScheduledBatch
from hwlm.engine.sequence import Sequence
from hwlm.models import CausalLM
from hwlm.models.layers import Linear
from hwlm.sampling.prompt_logprobs import record_prompt_logprobs
from hwlm.sampling.sampler import Sampler, Samples
from hwlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from hwlm.distributed.executor import Executor


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
        config: EngineConfig,
        executor: Executor | None = None,
    ) -> None:
        """``attach_kv_caches`` completes it: the cache is sized after ``warm_up`` has shown
        what the forward itself needs. With an ``executor`` (tensor parallelism) ``model`` is
        rank 0's shard, and every forward and logits product is announced to the workers
        first, so that they run theirs alongside."""
        self.model = model
        self.executor = executor
        self.compute_logits: Callable[[torch.Tensor], torch.Tensor] = (
            model.compute_logits
            if executor is None
            else functools.partial(executor.compute_logits, model)
        )
        self.backend = backend
        self.config = config
        self.block_size = config.block_size
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler(backend.greedy_sample, backend, backend.masked_greedy_sample)
        # With overlapped steps, a step whose batch has grammars leaves its sampling for later
        # (``Sampler.sample_later``): the engine starts its masks once the step before is
        # finished, and the next ``launch`` queues it before its own forward.
        self.defer_constrained_sampling = False
        self._last_samples: Samples | None = None  # the latest sampling step's
        self.decode_runner: DecodeRunner | None = None
        self.step_runner: StepRunner | None = None  # other steps (prefills, mixed)
        # Eager steps' row counts are padded up to these (``Backend.eager_token_buckets``).
        self.token_buckets = backend.eager_token_buckets(config.max_num_batched_tokens)
        backend.prepare_model(model)

    def attach_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """Use ``kv_caches`` from now on, and capture the decode graphs over them."""
        self.kv_caches = kv_caches
        self.decode_runner = self.step_runner = None
        if self.config.enforce_eager:
            return
        max_num_seqs, max_model_len = self.config.max_num_seqs, self.config.max_model_len
        if self.executor is not None:  # every rank captures its own, alongside
            self.executor.capture_decode(max_num_seqs, max_model_len)
        self.decode_runner = self.backend.capture_decode(
            self.model, kv_caches, max_num_seqs, max_model_len
        )
        if self.executor is None:  # TP: eager mixed steps (workers capture no pieces yet)
            self.step_runner = self.backend.capture_steps(self.model, kv_caches, self.token_buckets)

    def launch(self, batch: ScheduledBatch) -> Samples | None:
        """Queue one step on the device: inputs, forward, logits and sampling (or only the
        logits, see ``defer_constrained_sampling``). Returns the sampled tokens, still on the
        device (None when no sequence samples in this step). Only prompt logprobs read results
        back before returning."""
        if batch.copies:
            self.backend.copy_blocks(self.kv_caches, batch.copies)
        inputs = self.prepare(batch)
        if self.executor is not None:
            self.executor.send_step(
                inputs.input_ids, inputs.positions, inputs.metadata, batch.copies
            )
        with torch.inference_mode():
            hidden = self._forward(inputs)
            if any(s.wants_prompt_logprobs for s in batch.seqs):
                record_prompt_logprobs(batch, hidden, self.compute_logits)
            if not inputs.sample_seqs:
                return None
            logits = self.compute_logits(hidden[inputs.sample_rows])
            logits = logits[: len(inputs.sample_seqs)]  # without the padding rows
            seqs = inputs.sample_seqs
            if self.defer_constrained_sampling and any(s.grammar is not None for s in seqs):
                sampled: Samples = self.sampler.sample_later(logits, seqs)
            else:
                sampled = self.sampler.sample(logits, seqs)
        self._last_samples = sampled
        return sampled

    def warm_up(self, kv_caches: list[torch.Tensor], full: bool = True) -> None:
        """Dummy steps through the forward and both sampler paths (greedy, and a top-p draw: the
        costliest), so that the first requests do not wait for what compiles on first use
        (kernels, and their variants for one-token steps). They write no KV (slots -1), read only
        block 0 of ``kv_caches`` and leave the global random state as it was.

        ``full``: a step as large as the scheduler allows (decode rows beside prefill rows
        filling the rest of the token budget); run before the KV cache is sized, it shows the
        backend the peak memory of a step. Otherwise a small mixed step (a decode row beside a
        short prefill). Then, in both cases, a one-row decode step."""
        first = self._largest_step() if full else self._small_step()
        device = self.backend.device
        rng_devices = [] if device.index is None else [device.index]
        with torch.random.fork_rng(rng_devices, device_type=device.type):
            for q_lens in (first, [1]):
                self._dummy_step(kv_caches, q_lens)
        self._warm_up_buckets()
        self.backend.synchronize()

    def _warm_up_buckets(self) -> None:
        """Each dense layer shape (and the LM head) once at every bucket's row count, so that
        the device's GEMM library has chosen and loaded its kernels before requests come."""
        if not self.token_buckets or self.executor is not None:
            # Tensor-parallel layers run collectives that every rank must join: those warm
            # on their first steps instead.
            return
        layers: dict[tuple[int, int, bool, bool], torch.nn.Module] = {}
        for module in self.model.modules():
            if isinstance(module, Linear) and module is not self.model.lm_head:
                key = _linear_shape(module)
                layers.setdefault(key, module)
        hidden = self.model.config.hidden_size
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        device = self.backend.device
        with torch.inference_mode():
            for n in self.token_buckets:
                for (in_features, _, _, _), layer in layers.items():
                    layer(torch.zeros(n, in_features, dtype=dtype, device=device))
                if n <= self.config.max_num_seqs or n == self._bucket(self.config.max_num_seqs):
                    self.model.compute_logits(torch.zeros(n, hidden, dtype=dtype, device=device))

    def _largest_step(self) -> list[int]:
        """Query lengths of the largest step the scheduler allows."""
        cfg = self.config
        num_tokens, num_seqs = cfg.max_num_batched_tokens, cfg.max_num_seqs
        decodes = min(num_seqs - 1, num_tokens // 2)
        prefills: list[int] = []  # the rest of the budget, in prompts of at most max_model_len
        left = num_tokens - decodes
        while left > 0 and decodes + len(prefills) < num_seqs:
            prefills.append(min(left, cfg.max_model_len))
            left -= prefills[-1]
        return [1] * decodes + prefills

    def _small_step(self) -> list[int]:
        """Query lengths of a decode row beside a short prefill (the prefill alone when the
        scheduler runs one sequence at a time)."""
        cfg = self.config
        prefill = max(1, min(_WARM_UP_PREFILL, cfg.max_model_len - 1, cfg.max_num_batched_tokens))
        return [1, prefill] if cfg.max_num_seqs > 1 else [prefill]

    def _dummy_step(self, kv_caches: list[torch.Tensor], query_lens: list[int]) -> None:
        """A step of sequences with ``query_lens`` tokens each, all of them sampling."""
        prefill = max(query_lens)
        q_lens = np.array(query_lens, dtype=np.int64)
        query_start = np.concatenate([[0], np.cumsum(q_lens)])
        positions = np.arange(query_start[-1]) - np.repeat(query_start[:-1], q_lens)
        blocks = -(-prefill // self.block_size)
        ids, pos, slots, rows = self._upload(
            [np.zeros(positions.size, np.int64), positions, np.full(positions.size, -1),
             query_start[1:] - 1],
            torch.int64,
        )  # fmt: skip
        qsl, lens, tables = self._upload(
            [query_start, q_lens, np.zeros((len(q_lens), blocks))], torch.int32
        )
        metadata = AttentionMetadata(
            qsl, lens, tables.view(len(q_lens), blocks), slots, prefill, prefill
        )
        if self.executor is not None:
            self.executor.send_step(ids, pos, metadata, [])
        with torch.inference_mode():
            ctx = ForwardContext(self.backend, kv_caches, metadata)
            logits = self.compute_logits(self.model(ids, pos, ctx)[rows])
            for params in _WARM_UP_SAMPLING:
                dummies = [Sequence(-1 - i, "warm-up", [0], params) for i in range(len(q_lens))]
                self.sampler.sample(logits, dummies).to_output()

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        metadata = inputs.metadata
        if self._replays_graph(metadata.max_query_len, metadata.num_seqs):
            assert self.decode_runner is not None
            return self.decode_runner.run(inputs.input_ids, inputs.positions, metadata)
        if self.step_runner is not None and self.step_runner.fits(inputs.input_ids.shape[0]):
            return self.step_runner.run(inputs.input_ids, inputs.positions, metadata)
        ctx = ForwardContext(self.backend, self.kv_caches, metadata)
        hidden: torch.Tensor = self.model(inputs.input_ids, inputs.positions, ctx)
        return hidden

    def _replays_graph(self, max_query_len: int, num_seqs: int) -> bool:
        runner = self.decode_runner
        return runner is not None and max_query_len == 1 and runner.fits(num_seqs)

    def _bucket(self, n: int) -> int:
        """``n`` rows padded up to the next bucket (``n`` itself without buckets)."""
        buckets = self.token_buckets
        return buckets[bisect.bisect_left(buckets, n)] if buckets and n <= buckets[-1] else n

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's flattened inputs and AttentionMetadata, built with whole-array numpy ops
        (a Python loop over 256 sequences costs more than a small model's forward) and sent to
        the device in two copies. A token still in flight (sampled by the step before, see
        ``Sequence.num_pending_tokens``) is copied into place on the device."""
        seqs, counts = batch.seqs, batch.num_new_tokens
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, len(seqs))
        seq_lens = starts + np.asarray(counts, dtype=np.int64)
        query_start = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        max_query_len = int(max(counts))
        input_ids, token_seq = _input_ids(seqs, starts, counts, max_query_len)
        positions = np.arange(input_ids.size) - query_start[token_seq] + starts[token_seq]
        block_tables = _block_tables(seqs)
        bs = self.block_size
        slots = block_tables[token_seq, positions // bs].astype(np.int64) * bs + positions % bs
        full_lens = np.fromiter((s.num_tokens_with_pending for s in seqs), np.int64, len(seqs))
        sampling = seq_lens == full_lens
        sample_rows = query_start[1:][sampling] - 1
        sample_seqs = [s for s, last in zip(seqs, sampling.tolist(), strict=True) if last]
        pending = [i for i, s in enumerate(seqs) if s.num_pending_tokens]
        pending_src = np.fromiter((seqs[i].pending_row for i in pending), np.int64, len(pending))
        if not self._replays_graph(max_query_len, len(seqs)):
            input_ids, positions, slots, sample_rows = self._padded(
                input_ids, positions, slots, sample_rows
            )
        ids, pos, slot_mapping, rows, dst, src = self._upload(
            [input_ids, positions, slots, sample_rows, query_start[1:][pending] - 1, pending_src],
            torch.int64,
        )
        # A step before whose sampling waited for its masks is queued here, ahead of this forward
        # (its tokens are this step's inputs), once the host work above is done.
        last = None if self._last_samples is None else self._last_samples.complete()
        if pending:
            assert last is not None, "a token in flight without a sampling step"
            ids.index_copy_(0, dst, last.token_ids.index_select(0, src))
        qsl, lens, tables = self._upload([query_start, seq_lens, block_tables], torch.int32)
        metadata = AttentionMetadata(
            query_start_loc=qsl,
            seq_lens=lens,
            block_tables=tables.view(block_tables.shape),
            slot_mapping=slot_mapping,
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
        )
        return StepInputs(ids, pos, metadata, rows, sample_seqs)

    def _padded(
        self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """An eager step's inputs padded to its bucket: extra tokens (id 0 at position 0, slot
        -1: no KV written) that no sequence's attention reads, and extra sample rows repeating
        the first one, whose logits ``launch`` drops."""
        extra = self._bucket(ids.size) - ids.size
        if extra:
            ids = np.concatenate([ids, np.zeros(extra, ids.dtype)])
            positions = np.concatenate([positions, np.zeros(extra, positions.dtype)])
            slots = np.concatenate([slots, np.full(extra, -1, slots.dtype)])
        extra_rows = self._bucket(rows.size) - rows.size if rows.size else 0
        if extra_rows:
            rows = np.concatenate([rows, np.full(extra_rows, rows[0], rows.dtype)])
        return ids, positions, slots, rows

    def _upload(self, arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        """``arrays`` as 1-D tensors of ``dtype`` on the device, through one host buffer.

        Each array starts on a 16-byte boundary: Triton specialises kernels on pointer
        alignment, so unaligned offsets that vary with the batch would compile new variants."""
        itemsize = np.dtype(_NUMPY[dtype]).itemsize
        per_line = 16 // itemsize
        sizes = [a.size for a in arrays]
        offsets = np.concatenate([[0], np.cumsum([-(-n // per_line) * per_line for n in sizes])])
        flat = np.zeros(int(offsets[-1]), dtype=_NUMPY[dtype])
        for a, start in zip(arrays, offsets.tolist(), strict=False):
            flat[start : start + a.size] = a.ravel()
        flat_on_device = self.backend.upload(torch.from_numpy(flat))
        return [flat_on_device[o : o + n] for o, n in zip(offsets.tolist(), sizes, strict=False)]


def _linear_shape(layer: Linear) -> tuple[int, int, bool, bool]:
    """What a GEMM library's kernel choice for ``layer`` depends on besides the row count."""
    return layer.in_features, layer.out_features, layer.bias is not None, layer.kernel is not None


def _input_ids(
    seqs: list[Sequence], starts: np.ndarray, counts: list[int], max_query_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every scheduled token's id (0 for a token still in flight) and its sequence's index."""
    if max_query_len == 1:  # decode-shaped: each sequence's next token
        ids = np.fromiter(
            (
                s.token_ids[p] if p < len(s.token_ids) else 0
                for s, p in zip(seqs, starts.tolist(), strict=True)
            ),
            np.int64,
            len(seqs),
        )
        return ids, np.arange(len(seqs))
    chunks = []
    for s, p, n in zip(seqs, starts.tolist(), counts, strict=True):
        chunk = s.token_ids[p : p + n]
        chunks.append(chunk if len(chunk) == n else chunk + [0])  # the last one is in flight
    ids = np.fromiter(itertools.chain.from_iterable(chunks), np.int64, sum(counts))
    return ids, np.repeat(np.arange(len(seqs)), counts)


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32}

_WARM_UP_PREFILL = 8  # tokens of the small warm-up step's prefill
# The sampler's two paths: one pass for greedy rows; processing, top-p and a draw for the rest.
_WARM_UP_SAMPLING = (SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=0))


def _block_tables(seqs: list[Sequence]) -> np.ndarray:
    """[num_seqs, longest] int32 block ids, zero-padded."""
    lens = np.fromiter((len(s.block_ids) for s in seqs), np.int64, len(seqs))
    blocks = itertools.chain.from_iterable(s.block_ids for s in seqs)
    tables = np.zeros((len(seqs), int(lens.max())), dtype=np.int32)
    tables[np.arange(tables.shape[1]) < lens[:, None]] = np.fromiter(blocks, np.int32, lens.sum())
    return tables
