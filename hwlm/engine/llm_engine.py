"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out.

Platform-neutral: the backend (chosen by ``hwlm.registry``) owns the device, the KV cache and
attention; everything here is plain Python and torch.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hwlm.backend import Backend
from hwlm.config import (
    EngineConfig,
    ModelConfig,
    kv_cache_torch_dtype,
    parse_dtype,
    resolve_max_model_len,
)
from hwlm.distributed.sharding import check_tensor_parallel, kv_heads_per_rank
from hwlm.engine.block_manager import BlockManager
from hwlm.engine.heap import freeze_startup_heap
from hwlm.engine.model_runner import ModelRunner
from hwlm.engine.scheduler import ScheduledBatch, Scheduler
from hwlm.engine.sequence import Sequence
from hwlm.engine_args import EngineArgs
from hwlm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from hwlm.registry import select_backend
from hwlm.sampling.generation_config import load_sampling_defaults
from hwlm.sampling.parallel_sampling import catch_up_forks, fork_ready_samples, reported_samples
from hwlm.sampling.request_checks import check_params, tokenize_bad_words
from hwlm.sampling.sampler import DeferredSamples, SamplerOutput, Samples, TopLogprobs
from hwlm.sampling.stop_checker import check_stop
from hwlm.sampling.structured.advance import advance_grammars
from hwlm.sampling.structured.manager import StructuredOutputs
from hwlm.sampling_params import ParameterError, SamplingParams
from hwlm.text.tokenizer import decode_tokens, load_tokenizer, new_detokenizer

if TYPE_CHECKING:
    from hwlm.distributed.executor import Executor
    from hwlm.models.loader import ResolvedModel

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        from hwlm.models.loader import load_model, resolve_model

        if args.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {args.block_size}")
        torch.manual_seed(args.seed)
        resolved = resolve_model(args.model, args.load_format)
        self.model_config = ModelConfig.from_hf_dict(resolved.hf_config)
        self.backend = select_backend(args.device)()
        self.config = self._engine_config(args, self.model_config, self.backend)
        self.dtype = self._resolve_dtype(args.dtype)
        self.kv_dtype = kv_cache_torch_dtype(self.config.kv_cache_dtype, self.dtype)
        problems = self.backend.check(self.model_config, self.config, self.dtype)
        if problems:
            raise ValueError(
                f"{self.backend.name} cannot serve {args.model}: " + "; ".join(problems)
            )
        self.tokenizer = load_tokenizer(args.tokenizer or resolved.tokenizer_path)
        # Tensor parallelism: this process is rank 0; None (size 1) starts nothing.
        self.executor = self._start_executor(args, resolved)
        self.kv_heads = kv_heads_per_rank(self.model_config, args.tensor_parallel_size)
        start = time.perf_counter()
        model = load_model(
            resolved,
            self.model_config,
            self.backend,
            self.dtype,
            args.load_format,
            args.seed,
            args.quantization,
            parallel=None if self.executor is None else self.executor.group,
        )
        if self.executor is not None:
            self.executor.wait_until_loaded()
        logger.info("loaded %s in %.1fs", args.model, time.perf_counter() - start)
        self.runner = ModelRunner(model, self.backend, self.config, self.executor)
        self._warm_up()  # before the budget, which may count the warm-up step's peak
        num_blocks = self._num_kv_blocks()
        self.runner.attach_kv_caches(self._allocate_kv_cache(num_blocks))
        logger.info(
            "KV cache: %d blocks of %d tokens in %s",
            num_blocks,
            self.config.block_size,
            str(self.kv_dtype).removeprefix("torch."),
        )
        self.block_manager = BlockManager(
            num_blocks, self.config.block_size, self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.eos_token_ids = self._eos_token_ids()
        self.structured = StructuredOutputs(
            self.tokenizer, self.model_config.vocab_size, self.eos_token_ids
        )
        self.max_logprobs = args.max_logprobs
        self.sampling_defaults = load_sampling_defaults(
            resolved.weights_path or _local_folder(resolved.tokenizer_path)
        )
        self._seq_ids = itertools.count()
        self._requests: dict[str, list[Sequence]] = {}
        # Off: an exception while processing a request's output ends the step (LLM.generate).
        # On (AsyncLLMEngine): only that request is dropped; take_failed_requests() reports it.
        self.isolate_request_errors = False
        self._failed: list[tuple[str, Exception]] = []
        self.async_scheduling = (
            args.async_scheduling
            if args.async_scheduling is not None
            else self.backend.overlap_steps
        )
        self._in_flight: _LaunchedStep | None = None  # launched, tokens not yet read back
        self.runner.defer_constrained_sampling = self.async_scheduling
        freeze_startup_heap()  # full collections would walk the model's objects mid-serving

    # Set-up -----------------------------------------------------------------------------------

    @staticmethod
    def _engine_config(args: EngineArgs, model: ModelConfig, backend: Backend) -> EngineConfig:
        max_len = resolve_max_model_len(args.max_model_len, model)
        return EngineConfig(
            max_model_len=max_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens
            or max(_default_token_budget(args, backend), args.max_num_seqs),
            block_size=args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
            memory_utilization=args.memory_utilization,
            num_kv_blocks=args.num_kv_blocks,
            seed=args.seed,
            enforce_eager=args.enforce_eager,
            scheduling_policy=args.scheduling_policy,
            max_request_share=args.max_request_share,
            kv_cache_dtype=args.kv_cache_dtype,
        )

    def _start_executor(self, args: EngineArgs, resolved: ResolvedModel) -> Executor | None:
        """Start ranks 1..N-1 (``hwlm.distributed``) for ``tensor_parallel_size`` N > 1."""
        size = args.tensor_parallel_size
        check_tensor_parallel(self.model_config, size)
        if size == 1:
            return None
        gguf = str(resolved.weights_path or "").endswith(".gguf")
        if gguf or resolved.hf_config.get("quantization_config") is not None:
            raise ValueError(
                f"tensor_parallel_size {size}: pre-quantized checkpoints are not split yet; "
                "use tensor_parallel_size 1, or float weights with --quantization"
            )
        from hwlm.distributed.executor import start_executor

        return start_executor(args, self.backend, self.dtype, args.distributed_executor_backend)

    def _resolve_dtype(self, dtype: str) -> torch.dtype:
        if dtype != "auto":
            return parse_dtype(dtype)
        wanted = self.model_config.dtype
        if wanted in self.backend.supported_dtypes:
            return wanted
        chosen = self.backend.preferred_dtype
        logger.info("dtype auto: %s runs %s models in %s", self.backend.name, wanted, chosen)
        return chosen

    def _warm_up(self) -> None:
        """Dummy steps on a one-block cache, so that the first requests do not wait for what
        compiles on first use (``ModelRunner.warm_up``). A backend that profiles memory with
        the warm-up gets a step as large as the scheduler allows; others a small one."""
        start = time.perf_counter()
        full = self.backend.profile_memory_with_warm_up
        self.runner.warm_up(self._allocate_kv_cache(1), full=full)
        logger.info("warmed up in %.1fs", time.perf_counter() - start)

    def _allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        """This rank's cache (its KV heads); the workers allocate theirs alike."""
        m = self.model_config
        if self.executor is not None:
            self.executor.allocate_kv_cache(num_blocks, self.config.block_size, self.kv_dtype)
        return self.backend.allocate_kv_cache(
            m.num_layers,
            num_blocks,
            self.config.block_size,
            self.kv_heads,
            m.head_size,
            self.kv_dtype,
        )

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        useful = cfg.max_num_seqs * cfg.blocks_for_tokens(cfg.max_model_len)
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        block_bytes = self.model_config.kv_bytes_per_token(self.kv_dtype) * cfg.block_size
        budget = self.backend.memory_budget(cfg.memory_utilization)
        if self.executor is not None:  # every rank holds every block: the smallest budget
            block_bytes = block_bytes * self.kv_heads // self.model_config.num_kv_heads
            budget = self.executor.min_memory_budget(budget, cfg.memory_utilization)
        fitting = budget // block_bytes
        if fitting < cfg.blocks_for_tokens(cfg.max_model_len):
            raise ValueError(
                f"the KV cache budget ({budget / 2**30:.2f} GiB) holds {fitting} blocks, fewer than "
                f"one sequence of max_model_len={cfg.max_model_len} needs; lower max_model_len or "
                "raise memory_utilization"
            )
        return int(min(fitting, useful))

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's rule: only
        repetition_penalty, temperature, top_k, top_p, min_p and max_new_tokens are taken;
        ``sampling_defaults`` holds them as a dict, for filling a request's unset fields)."""
        return SamplingParams(**self.sampling_defaults)

    # Requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | dict[str, Any] | list[int],
        params: SamplingParams,
        stream: bool = False,
        priority: int = 0,
        group: str | None = None,
    ) -> None:
        """Queue a request. With ``stream``, ``step()`` also reports it after every new token
        (cumulative text and token ids); otherwise only once it has finished. ``priority``
        orders requests under the priority scheduling policy (lower first); with fcfs it must
        be 0, as in vLLM. ``group`` names the requests that share one seat allowance under
        ``max_request_share`` (default: the request alone)."""
        if priority and self.config.scheduling_policy != "priority":
            raise ParameterError(
                f"priority {priority} needs scheduling_policy 'priority' (it is "
                f"{self.config.scheduling_policy!r})",
                "priority",
            )
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids, params)
        vocab = self.model_config.vocab_size
        check_params(params, vocab, self.max_logprobs, stream)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(next(self._seq_ids), request_id, token_ids, params, text, self.eos_token_ids)
        seq.bad_words_token_ids = tokenize_bad_words(self.tokenizer, params.bad_words or [], vocab)
        if params.structured_outputs is not None:  # compiled (or found in the cache) here
            seq.grammar = self.structured.new_state(params.structured_outputs)
        seq.stream = stream
        seq.priority = priority
        seq.group = group or request_id
        if params.stop_strings or (stream and params.detokenize):  # text to check or stream
            seq.detokenizer = new_detokenizer(
                self.tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens
            )
        self._requests[request_id] = [seq]
        self.scheduler.add(seq)

    def _tokenize(self, prompt: str | dict[str, Any] | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(
            f"a prompt must be a string, a token-id list or a dict, got {type(prompt).__name__}"
        )

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        cfg = self.config
        if not token_ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(token_ids) >= cfg.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {cfg.max_model_len}: "
                f"at most {cfg.max_model_len - 1} prompt tokens leave room to generate"
            )
        longest = min(len(token_ids) + (params.max_tokens or cfg.max_model_len), cfg.max_model_len)
        needed = cfg.blocks_for_tokens(longest)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"a sequence of {longest} tokens needs {needed} KV blocks but the cache has only "
                f"{self.block_manager.num_blocks}; raise num_kv_blocks or lower max_tokens"
            )

    def abort_request(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # The step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of requests that finished in it, and of
        streamed requests that got a token (``step_updates``, as cumulative RequestOutputs)."""
        return self._collect_outputs(self.step_updates())

    def step_updates(self) -> list[RequestUpdate]:
        """Run one scheduled batch; return the requests that finished in it, and the streamed
        requests that got a token, as their sequences: nothing is copied, so the cost does not
        grow with the length of an output (``hwlm.engine.deltas`` reads only what is new).

        With overlapped steps (``async_scheduling``) the batch is launched before the previous
        one's tokens are read back: the device runs step n while the host schedules and prepares
        step n + 1, and the updates returned are those of step n."""
        if self._in_flight is not None and self._must_drain(self._in_flight):
            return self._drain()
        batch = self.scheduler.schedule()
        launched = None if batch.is_empty() else self._launch(batch)
        deferred = launched.sampled if launched is not None else None
        start_masks = deferred.start_masks if isinstance(deferred, DeferredSamples) else None
        outputs = self._drain(start_masks)
        if start_masks is not None:
            start_masks()  # when nothing was in flight (a no-op once started)
        if self.async_scheduling:
            self._in_flight = launched
        elif launched is not None:
            outputs = self._finish(launched)
        return outputs

    def _launch(self, batch: ScheduledBatch) -> _LaunchedStep:
        """Queue ``batch`` on the device and advance every sequence as if it had run."""
        # A forking parent completes its prompt in this step, so no mask being filled for the
        # step before has its grammar (``DeferredSamples``): copying it is safe.
        parents = self._fork_samples(batch.seqs, batch.num_new_tokens)
        sampled = self.runner.launch(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
        catch_up_forks(parents)
        for parent in parents:
            parent.pending_forks = []
        for row, seq in enumerate(sampled.seqs if sampled is not None else ()):
            seq.num_pending_tokens += 1
            seq.pending_row = row
        return _LaunchedStep(batch.seqs, sampled)

    def _drain(self, after_advance: Callable[[], None] | None = None) -> list[RequestUpdate]:
        """Finish the step in flight, if any (``after_advance``: see ``_finish``)."""
        step, self._in_flight = self._in_flight, None
        return [] if step is None else self._finish(step, after_advance)

    def _must_drain(self, step: _LaunchedStep) -> bool:
        """Whether the next step can only be scheduled once ``step``'s tokens are on the host:
        a sampler that reads the generated tokens (penalties, bad words, min_tokens), a cache
        so full that scheduling might preempt a sequence with a token in flight, or a request
        over its share of the seats while another waits (``Scheduler.wants_seats_back``). A
        grammar does not: the next step samples only once ``step`` has advanced its grammars
        and its masks are filled (``DeferredSamples``)."""
        if step.sampled is not None and any(
            _reads_output_tokens(s.params) for s in step.sampled.seqs
        ):
            return True
        running = len(self.scheduler.running)
        budget_blocks = self.config.blocks_for_tokens(self.config.max_num_batched_tokens)
        if self.block_manager.num_free_blocks < 2 * running + budget_blocks:
            return True
        return self.scheduler.wants_seats_back()

    def _finish(
        self, step: _LaunchedStep, after_advance: Callable[[], None] | None = None
    ) -> list[RequestUpdate]:
        """Bring ``step``'s tokens to the host and apply them: tokens, stops, updates.
        ``after_advance`` is called once the tokens have advanced the grammars, before the rest
        (the next step's masks start there, see ``DeferredSamples``)."""
        out = step.sampled.to_output() if step.sampled is not None else None
        for seq in step.seqs:
            if not seq.is_finished:
                self.block_manager.cache_computed_blocks(seq)
        if out is None:
            return []
        for seq in out.seqs:
            seq.num_pending_tokens -= 1
        finished = self._append_tokens(out.seqs, out, after_advance)
        updates = [self._update(request_id, finished=True) for request_id in finished]
        streamed = {s.request_id for s in out.seqs if s.stream}
        streamed = {r for r in streamed if r in self._requests} - set(finished)
        return updates + [self._update(r, finished=False) for r in sorted(streamed)]

    def _update(self, request_id: str, finished: bool) -> RequestUpdate:
        """A finished request is forgotten here: its update holds the last of it."""
        seqs = self._requests.pop(request_id) if finished else self._requests[request_id]
        samples = seqs if len(seqs) == 1 else reported_samples(seqs, finished)
        return RequestUpdate(request_id, seqs[0], samples, finished)

    def _collect_outputs(self, updates: list[RequestUpdate]) -> list[RequestOutput]:
        outputs = []
        for update in updates:
            try:
                outputs.append(self._request_output(update))
            except Exception as exc:
                if not self.isolate_request_errors:
                    raise
                self._fail_request(update.request_id, exc)
        return outputs

    def _fail_request(self, request_id: str, exc: Exception) -> None:
        logger.error("request %s failed; dropping it", request_id, exc_info=exc)
        self.abort_request(request_id)
        self._failed.append((request_id, exc))

    def take_failed_requests(self) -> list[tuple[str, Exception]]:
        """The requests dropped since the last call (with ``isolate_request_errors``)."""
        failed, self._failed = self._failed, []
        return failed

    def _fork_samples(self, seqs: list[Sequence], num_new_tokens: list[int]) -> list[Sequence]:
        """Parallel sampling (``hwlm.sampling.parallel_sampling``): fork the requests whose prompt
        completes in this step, and admit the forks."""
        parents = fork_ready_samples(
            seqs, num_new_tokens, self.block_manager, lambda: next(self._seq_ids)
        )
        for parent in parents:
            for child in parent.pending_forks:
                self.scheduler.add_running(child)
                self._requests[parent.request_id].append(child)
        return parents

    def _append_tokens(
        self,
        seqs: list[Sequence],
        out: SamplerOutput,
        after_advance: Callable[[], None] | None = None,
    ) -> list[str]:
        """Append each sequence's token and advance the step's grammars together, then (after
        ``after_advance``) detokenize and apply the stops; returns the requests that
        finished."""
        live = [  # not failed earlier in this step, aborted, or stopped by the step before
            (i, seq)
            for i, seq in enumerate(seqs)
            if seq.request_id in self._requests and not seq.is_finished
        ]
        for i, seq in live:
            seq.token_ids.append(out.token_ids[i])
        rejected = self._advance_grammars([seq for _, seq in live if seq.grammar is not None])
        if after_advance is not None:
            after_advance()
        appended: list[tuple[Sequence, bool]] = []  # (sequence, stopped)
        for i, seq in live:
            try:
                appended.append((seq, self._take_token(seq, i, out)))
            except Exception as exc:
                self._fail_or_raise(seq, exc)
        finished: list[str] = []
        for seq, stopped in appended:
            if seq.request_id not in self._requests:
                continue  # another sequence of its request failed
            if seq.seq_id in rejected:
                self._fail_or_raise(seq, rejected[seq.seq_id])
                continue
            if seq.grammar is not None and _grammar_stops(seq, stopped):
                stopped = True
            if stopped:
                self.scheduler.finish(seq)
                if all(s.is_finished for s in self._requests[seq.request_id]):
                    finished.append(seq.request_id)
        return finished

    def _fail_or_raise(self, seq: Sequence, exc: Exception) -> None:
        if not self.isolate_request_errors:
            raise exc
        self._fail_request(seq.request_id, exc)

    def _advance_grammars(self, seqs: list[Sequence]) -> dict[int, ValueError]:
        """Advance the grammars of ``seqs`` over their new tokens in one parallel call; the
        rejections by ``seq_id`` (only conflicting controls can sample a refused token)."""
        if not seqs:
            return {}
        errors, seconds = advance_grammars(seqs)
        self.runner.sampler.masks.stats.add_advance(seconds)
        return {seqs[k].seq_id: error for k, error in errors.items()}

    def _take_token(self, seq: Sequence, i: int, out: SamplerOutput) -> bool:
        """Detokenize the token just appended to ``seq`` (row ``i`` of ``out``) and record its
        logprobs; True if it stops ``seq`` (its grammar may stop it too: ``_grammar_stops``)."""
        token = out.token_ids[i]
        new_text = seq.detokenizer.add(token) if seq.detokenizer is not None else ""
        seq.cumulative_logprob += out.logprobs[i]
        top = out.top_logprobs[i]
        if seq.logprobs is not None and top is not None:
            seq.logprobs.append(self._logprob_entry(token, out.logprobs[i], top, seq))
        return check_stop(seq, token, new_text, self.config.max_model_len)

    def _logprob_entry(
        self, token: int, logprob: float, top: TopLogprobs, seq: Sequence
    ) -> dict[int, Logprob]:
        ids, values, rank = top
        entry = {t: Logprob(v, r + 1) for r, (t, v) in enumerate(zip(ids, values, strict=True))}
        entry.setdefault(token, Logprob(logprob, rank))
        if seq.params.detokenize:
            for token_id, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([token_id])
        return entry

    def _request_output(self, update: RequestUpdate) -> RequestOutput:
        first = update.first
        return RequestOutput(
            request_id=update.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.token_ids[: first.num_prompt_tokens],
            outputs=[self._completion(i, seq) for i, seq in enumerate(update.samples)],
            finished=update.finished,
            num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=self._prompt_logprobs(first),
        )

    def _prompt_logprobs(self, seq: Sequence) -> PromptLogprobs | None:
        if seq.prompt_logprobs is None:
            return None
        if seq.params.detokenize:
            for entry in seq.prompt_logprobs:
                for token_id, lp in (entry or {}).items():
                    if lp.decoded_token is None:
                        lp.decoded_token = self.tokenizer.decode([token_id])
        return list(seq.prompt_logprobs)

    def _completion(self, index: int, seq: Sequence) -> CompletionOutput:
        params = seq.params
        output_ids = seq.output_token_ids
        if not params.detokenize:
            text = ""
        elif seq.output_text is not None:  # cut at a stop string
            text = seq.output_text
        elif seq.detokenizer is not None and not seq.is_finished:
            text = seq.detokenizer.text
            hold = params.output_text_buffer_length  # a stop string may still start here
            text = text[: max(0, len(text) - hold)]
        else:
            text = decode_tokens(
                self.tokenizer,
                output_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
            )
        logprobs = None
        if seq.logprobs is not None:
            logprobs = [dict(entry) for entry in seq.logprobs]  # a snapshot: seq keeps growing
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=output_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )


@dataclass(frozen=True)
class RequestUpdate:
    """A request that a step finished, or a streamed one it gave a token: its sequences, live
    (read them before the next step)."""

    request_id: str
    first: Sequence  # the request's first sequence: prompt, cached tokens, prompt logprobs
    samples: list[Sequence]  # what its output reports, in order (``reported_samples``)
    finished: bool


@dataclass
class _LaunchedStep:
    seqs: list[Sequence]  # the scheduled sequences
    sampled: Samples | None  # their samples, on the device (or yet to be queued)


def _reads_output_tokens(params: SamplingParams) -> bool:
    """``needs_output_history`` without the grammar (see ``LLMEngine._must_drain``)."""
    if params.structured_outputs is None:
        return params.needs_output_history
    return params.has_penalties or bool(params.bad_words) or params.min_tokens > 0


def _grammar_stops(seq: Sequence, stopped: bool) -> bool:
    """Whether ``seq``'s grammar ends it: complete, nothing but EOS could follow. Then its
    finish reason is "stop", also when max_tokens was reached with the same token."""
    assert seq.grammar is not None
    if seq.grammar.is_finished and (not stopped or seq.finish_reason == "length"):
        seq.finish_reason, seq.stop_reason = "stop", None
        return True
    return False


def _default_token_budget(args: EngineArgs, backend: Backend) -> int:
    return backend.default_max_num_batched_tokens(args.offline)


def _local_folder(path: str) -> str | None:
    return path if Path(path).is_dir() else None
