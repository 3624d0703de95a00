"""EngineCore: an ``LLMEngine`` driven by messages, whatever carries them.

The same object runs on the engine thread of ``InProcessEngineClient`` and in the engine process
of ``MultiProcessEngineClient`` (``hwlm.engine.core_process``), so both clients see the same
messages. ``process(inputs)`` is one turn of the loop: apply the inputs (add, abort), then run one
step if there is work, and return what to send back. It is not thread-safe: one thread owns it.

Requests arrive as token ids; outputs leave as token-id deltas (``hwlm.engine.deltas``). The
engine core detokenizes only to find stop strings: a request without any reaches the engine with
``detokenize=False``, so the engine decodes nothing for it (text is the API side's job).
The serving metrics (token counters, latency histograms) are kept here, where every request's
progress is seen after every step, streamed or not.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import TYPE_CHECKING

from hwlm.engine.deltas import DeltaTracker
from hwlm.engine.messages import (
    AbortRequests,
    Accepted,
    AddRequest,
    EngineInfo,
    EngineOutput,
    EngineStats,
    HistogramCounts,
    RequestError,
    StepOutputs,
)
from hwlm.engine.serving_metrics import Histogram, ServingMetrics, finish_reason
from hwlm.engine.turn_trace import TurnTrace
from hwlm.sampling_params import ParameterError, SamplingParams

if TYPE_CHECKING:
    from hwlm.engine.llm_engine import LLMEngine, RequestUpdate
    from hwlm.engine_args import EngineArgs

logger = logging.getLogger(__name__)

STATS_INTERVAL = 0.1  # seconds between EngineStats while busy


class EngineCore:
    def __init__(self, engine: LLMEngine, info: EngineInfo) -> None:
        self.engine = engine
        self.info = info
        engine.isolate_request_errors = True  # one request's failure fails only that one
        self._tracker = DeltaTracker()
        self._metrics = ServingMetrics()
        self._last_stats: EngineStats | None = None
        self._last_stats_time = 0.0
        self._trace = TurnTrace.from_env()

    @classmethod
    def from_args(cls, args: EngineArgs) -> EngineCore:
        """Build and warm up the engine (raises what ``LLMEngine`` raises)."""
        from hwlm.engine.llm_engine import LLMEngine

        engine = LLMEngine(args)
        return cls(engine, engine_info(engine, args))

    # One turn -------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def check_health(self) -> None:
        """Raise if a part of the engine has died, as the next step would (a tensor-parallel
        worker): the idle loop calls it, so that a failure is seen without a request."""
        if self.engine.executor is not None:
            self.engine.executor.check_alive()

    def process(self, inputs: list[AddRequest | AbortRequests]) -> list[EngineOutput]:
        """Apply ``inputs``, then step if there is work; the messages to send, in order.
        Raises whatever a failed step raises (the engine is then unusable)."""
        start = time.monotonic()
        messages = self._apply(inputs)
        applied = time.monotonic()
        messages.extend(self._step_or_stats())
        if self._trace is not None:
            aborts = sum(len(m.request_ids) for m in inputs if isinstance(m, AbortRequests))
            scheduler = self.engine.scheduler
            self._trace.record(
                start,
                applied,
                len(inputs) - sum(isinstance(m, AbortRequests) for m in inputs),
                aborts,
                len(scheduler.running),
                len(scheduler.waiting),
            )
        return messages

    def _step_or_stats(self) -> list[EngineOutput]:
        if self.has_work():
            return self._step()
        stats = self.stats()
        if stats != self._last_stats:  # just went idle, or aborts changed the counters
            return [self._sent_stats(stats)]
        return []

    def _apply(self, inputs: list[AddRequest | AbortRequests]) -> list[EngineOutput]:
        accepted: list[str] = []
        messages: list[EngineOutput] = []
        for message in inputs:
            if isinstance(message, AbortRequests):
                for request_id in message.request_ids:
                    self._abort(request_id)
                continue
            error = self._add(message)
            if error is None:
                accepted.append(message.request_id)
            else:
                messages.append(error)
        if accepted:
            messages.insert(0, Accepted(accepted))
        return messages

    def _add(self, message: AddRequest) -> RequestError | None:
        request_id = message.request_id
        try:
            params = _engine_params(message.params.to_params())
            self.engine.add_request(
                request_id,
                message.prompt_token_ids,
                params,
                message.stream,
                priority=message.priority,
                group=message.group,
            )
        except ParameterError as exc:
            return RequestError(request_id, str(exc), exc.param)
        except Exception as exc:  # a bad prompt (ValueError), or a bug: refuse only this one
            if not isinstance(exc, ValueError):
                logger.exception("adding request %s failed", request_id)
            return RequestError(request_id, str(exc) or repr(exc))
        self._tracker.start(request_id)
        self._metrics.on_added(request_id, message.arrival_time)
        return None

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._tracker.drop(request_id)
        self._metrics.on_aborted(request_id)

    def _step(self) -> list[EngineOutput]:
        updates = self.engine.step_updates()
        self._record(updates)
        messages: list[EngineOutput] = []
        for request_id, exc in self.engine.take_failed_requests():
            self._tracker.drop(request_id)
            self._metrics.on_aborted(request_id)
            messages.append(
                RequestError(request_id, f"request {request_id} failed: {exc!r}", rejected=False)
            )
        deltas = [d for u in updates if (d := self._tracker.delta(u)) is not None]
        now = time.monotonic()
        ended = bool(messages) or any(d.finished for d in deltas)
        if ended or now - self._last_stats_time >= STATS_INTERVAL:
            messages.insert(0, self._sent_stats(self.stats()))  # before the outputs: see above
        if deltas:
            messages.append(StepOutputs(deltas))
        return messages

    # Metrics --------------------------------------------------------------------------------

    def _record(self, updates: list[RequestUpdate]) -> None:
        """Every running request's output-token count after this step (streamed or not), then
        the requests that finished in it."""
        now = time.monotonic()
        counts: dict[str, tuple[int, int]] = {}  # request id -> (output tokens, prompt tokens)
        for seq in self.engine.scheduler.running:
            entry = counts.get(seq.request_id)
            num_output = seq.num_output_tokens + (entry[0] if entry is not None else 0)
            counts[seq.request_id] = (num_output, seq.num_prompt_tokens)
        finished = [u for u in updates if u.finished]
        for update in finished:
            num_output = sum(seq.num_output_tokens for seq in update.samples)
            counts[update.request_id] = (num_output, update.first.num_prompt_tokens)
        self._metrics.on_step(counts, now)
        for update in finished:
            reason = finish_reason([seq.finish_reason for seq in update.samples])
            self._metrics.on_finished(update.request_id, reason, now)

    def stats(self) -> EngineStats:
        e, blocks = self.engine, self.engine.block_manager
        serving = self._metrics.snapshot()
        return EngineStats(
            num_running=len({s.request_id for s in e.scheduler.running}),
            num_waiting=len({s.request_id for s in e.scheduler.waiting}),
            num_running_seqs=e.scheduler.num_running_seqs(),
            num_waiting_seqs=e.scheduler.num_waiting_seqs(),
            num_free_blocks=blocks.num_free_blocks,
            num_blocks=blocks.num_blocks,
            kv_cache_usage=blocks.usage(),
            prefix_cache_queries=blocks.prefix_query_tokens,
            prefix_cache_hits=blocks.prefix_hit_tokens,
            num_preemptions=e.scheduler.num_preemptions,
            prompt_tokens=serving.prompt_tokens,
            generation_tokens=serving.generation_tokens,
            finished=serving.finished,
            ttft=_counts(serving.ttft),
            itl=_counts(serving.itl),
            e2e=_counts(serving.e2e),
        )

    def _sent_stats(self, stats: EngineStats) -> EngineStats:
        self._last_stats, self._last_stats_time = stats, time.monotonic()
        return stats


def engine_info(engine: LLMEngine, args: EngineArgs) -> EngineInfo:
    tokenizer = args.tokenizer or str(getattr(engine.tokenizer, "name_or_path", "") or args.model)
    return EngineInfo(
        model=args.model,
        tokenizer=tokenizer,
        architecture=engine.model_config.architecture,
        backend=engine.backend.name,
        dtype=str(engine.dtype).removeprefix("torch."),
        vocab_size=engine.model_config.vocab_size,
        max_model_len=engine.config.max_model_len,
        max_logprobs=engine.max_logprobs,
        eos_token_ids=list(engine.eos_token_ids),
        block_size=engine.config.block_size,
        num_kv_blocks=engine.block_manager.num_blocks,
        sampling_defaults=dict(engine.sampling_defaults),
        pid=os.getpid(),
    )


def _engine_params(params: SamplingParams) -> SamplingParams:
    """What the engine needs of ``params``: text only to find stop strings. A shallow copy, not
    ``dataclasses.replace``: the parameters were validated once already, and validating again
    was a third of the cost of admitting a request."""
    if params.detokenize and not params.stop_strings:
        engine_params = copy.copy(params)
        engine_params.detokenize = False
        return engine_params
    return params


def _counts(hist: Histogram) -> HistogramCounts:
    return HistogramCounts(list(hist.counts), hist.sum, hist.count)
