"""The server's seam over the engine core in its own process (``hwlm serve --engine-process``).

``ProcessEngineSeam`` gives the routes what ``EngineSeam`` gives them, over a
``MultiProcessEngineClient``: the limits and sampling defaults come from the engine's handshake,
the tokenizer is loaded here from the handshake's tokenizer path (tokenizing, detokenizing and
chat templates happen in this process), and each request's deltas become cumulative
``RequestOutput``s through a ``RequestOutputAssembler``. The client's errors are the server's own
(``EngineDeadError`` answers 503), so the routes cannot tell the two seams apart.

A streamed response reads its requests through their ``choice_feed``s instead: the assembler
knows what each delta adds, so each event is made from the new text and tokens alone, without a
cumulative ``RequestOutput`` or a comparison with what was sent (the same updates as
``ChoiceTracker`` finds in the cumulative outputs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from hwlm.engine import client_stream
from hwlm.engine.client_mp import MultiProcessEngineClient
from hwlm.engine.client_outputs import RequestOutputAssembler
from hwlm.engine.dp_client import DataParallelEngineClient
from hwlm.engine.messages import EngineStats as CoreStats
from hwlm.engine.messages import RequestDelta
from hwlm.engine.serving_metrics import MetricsSnapshot
from hwlm.outputs import RequestOutput
from hwlm.sampling_params import SamplingParams
from hwlm.server.async_engine import EngineStats
from hwlm.server.choice_stream import ChoiceFeed, ChoiceUpdate, Progress, text_delta
from hwlm.server.engine_seam import OutputStream, Prompt, submit_all
from hwlm.server.seam_text import SeamText
from hwlm.text.tokenizer import load_tokenizer


class ProcessOutputStream:
    """One request's cumulative outputs, assembled from the client's deltas (``OutputStream``),
    or its streamed choices (``choice_feed``)."""

    def __init__(
        self, stream: client_stream.RequestStream, assembler: RequestOutputAssembler
    ) -> None:
        self.request_stream = stream  # its deltas
        self._assembler = assembler

    async def __anext__(self) -> RequestOutput:
        self.fold(await self.request_stream.__anext__())
        self.fold_pending()
        return self._assembler.output()

    def take_pending(self) -> RequestOutput | None:
        return self._assembler.output() if self.fold_pending() else None

    def abort(self) -> None:
        self.request_stream.abort()

    def choice_feed(self, prompt_index: int, n: int, token_updates: bool) -> ChoiceFeed:
        return _AssembledFeed(self, self._assembler, prompt_index, n, token_updates)

    def fold_pending(self) -> bool:
        """Fold the deltas already waiting; whether there were any."""
        next_nowait = self.request_stream.next_nowait
        delta = next_nowait()
        if delta is None:
            return False
        while delta is not None:
            self.fold(delta)
            delta = next_nowait()
        return True

    def fold(self, delta: RequestDelta) -> None:
        """Apply one of the request's deltas to its assembler."""
        try:
            self._assembler.fold(delta)
        except Exception as exc:
            self.request_stream.abort()
            raise client_stream.RequestFailedError(
                f"request {self._assembler.request_id} failed: {exc!r}"
            ) from exc


@dataclass(slots=True)
class _Sent:
    """What one choice has been sent."""

    chars: int = 0
    num_tokens: int = 0
    started: bool = False
    finished: bool = False


class _AssembledFeed:
    """A request's streamed choices read from its assembler: a ``ChoiceFeed`` that is its own
    ``Progress``. The running text comes from ``AssembledSample.take_text``, which returns only
    what is new; a finished sample's (final) text is compared with what was sent, as
    ``ChoiceTracker`` compares every text."""

    def __init__(
        self,
        stream: ProcessOutputStream,
        assembler: RequestOutputAssembler,
        prompt_index: int,
        n: int,
        token_updates: bool,
    ) -> None:
        self._stream = stream
        self._assembler = assembler
        self._prompt_index = prompt_index
        self._first_index = prompt_index * n  # the choice index of sample 0
        self._token_updates = token_updates
        self._sent: dict[int, _Sent] = {}

    async def __anext__(self) -> Progress:
        stream = self._stream
        stream.fold(await stream.request_stream.__anext__())
        stream.fold_pending()
        return self

    def take_pending(self) -> Progress | None:
        return self if self._stream.fold_pending() else None

    def abort(self) -> None:
        self._stream.abort()

    @property
    def finished(self) -> bool:
        return self._assembler.finished

    def usage_counts(self) -> tuple[int, int]:
        assembler = self._assembler
        generated = sum(len(sample.token_ids) for sample in assembler.samples)
        return len(assembler.prompt_token_ids), generated

    def updates(self) -> Iterator[ChoiceUpdate]:
        assembler = self._assembler
        for sample in assembler.samples:
            sent = self._sent.get(sample.index)
            if sent is None:
                sent = self._sent[sample.index] = _Sent()
            elif sent.finished:
                continue
            finish_reason = sample.finish_reason
            if finish_reason is None:
                delta = sample.take_text()
            else:
                delta = text_delta(sample.taken_text(), sample.final_text or "")
            num_tokens = len(sample.token_ids)
            if not (
                delta
                or finish_reason is not None
                or (self._token_updates and num_tokens > sent.num_tokens)
            ):
                continue
            yield ChoiceUpdate(
                self._first_index + sample.index,
                self._prompt_index,
                delta,
                sent.chars,
                not sent.started,
                sample.token_ids,
                sent.num_tokens,
                num_tokens,
                sample.logprobs,
                finish_reason,
                sample.stop_reason,
                assembler.prompt_token_ids,
                assembler.prompt_logprobs,
            )
            sent.started = True
            sent.num_tokens = num_tokens
            sent.chars += len(delta)
            sent.finished = finish_reason is not None


class ProcessEngineSeam(SeamText):
    """The engine as the routes see it (``Seam``), the engine core running in its own process
    (or several cores, with ``--data-parallel-size``). Does not own ``client``: whoever built it
    shuts it down."""

    def __init__(
        self,
        client: MultiProcessEngineClient | DataParallelEngineClient,
        tokenizer: Any | None = None,
    ) -> None:
        self._client = client
        self._tokenizer = (
            tokenizer if tokenizer is not None else load_tokenizer(client.info.tokenizer)
        )

    # The model ------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._client.info.max_model_len

    @property
    def max_logprobs(self) -> int:
        return self._client.info.max_logprobs

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        return dict(self._client.info.sampling_defaults)

    # Load -----------------------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        return self._client.is_healthy()

    def num_waiting_sequences(self) -> int:
        return self._client.num_waiting_sequences()

    def stats_snapshot(self) -> EngineStats:
        s = self._client.stats_snapshot()
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks,
            num_blocks=s.num_blocks,
            num_streams=self._client.num_unfinished_requests(),
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
        )

    def metrics_snapshot(self) -> MetricsSnapshot:
        return self._client.serving_snapshot()

    def core_stats(self) -> list[CoreStats]:
        """Each engine core's stats: one entry, or one per core with --data-parallel-size."""
        client = self._client
        if isinstance(client, DataParallelEngineClient):
            return client.core_stats()
        return [client.stats_snapshot()]

    # Requests -------------------------------------------------------------------------------------

    async def submit(
        self,
        base_id: str,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        stream: bool,
        priority: int = 0,
    ) -> list[OutputStream]:
        """As ``EngineSeam.submit``: all or none, the first error raised."""
        return await submit_all(
            [
                self._add(f"{base_id}-{i}", base_id, p, params, stream, priority)
                for i, p in enumerate(prompts)
            ]
        )

    async def _add(
        self,
        request_id: str,
        group: str,
        prompt: Prompt,
        params: SamplingParams,
        stream: bool,
        priority: int,
    ) -> ProcessOutputStream:
        assembler = RequestOutputAssembler(
            request_id,
            prompt.token_ids,
            params,
            self._tokenizer,
            prompt=prompt.text,
            stream=stream,
            track_new_text=stream,  # for choice_feed
        )
        request_stream = await self._client.add_request(
            request_id, prompt.token_ids, params, stream=stream, priority=priority, group=group
        )
        return ProcessOutputStream(request_stream, assembler)
