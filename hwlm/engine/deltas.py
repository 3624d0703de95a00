"""Per-step deltas from the engine's request updates.

``LLMEngine.step_updates()`` reports a streamed request after every token, as its live
sequences; ``DeltaTracker`` remembers how much of each sample it has already sent and reads only
what is new (token ids and logprobs past that point), in wire form
(``hwlm.engine.messages.RequestDelta``). Nothing here grows with the length of an output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hwlm.engine.messages import RequestDelta, SampleDelta, TokenLogprobs
from hwlm.outputs import Logprob

if TYPE_CHECKING:
    from hwlm.engine.llm_engine import RequestUpdate
    from hwlm.engine.sequence import Sequence


@dataclass
class _Sent:
    num_tokens: dict[int, int] = field(default_factory=dict)  # sample index -> tokens sent
    finished: set[int] = field(default_factory=set)  # sample indices whose end was sent
    num_cached_tokens: int | None = None  # None: nothing sent yet


class DeltaTracker:
    """What every live request has sent so far."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def start(self, request_id: str) -> None:
        self._sent[request_id] = _Sent()

    def drop(self, request_id: str) -> None:
        self._sent.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._sent)

    def delta(self, update: RequestUpdate) -> RequestDelta | None:
        """What ``update`` adds to the request's earlier deltas; None if nothing (or if the
        request is not tracked: aborted meanwhile). A finished request is forgotten."""
        sent = self._sent.get(update.request_id)
        if sent is None:
            return None
        if update.finished:
            del self._sent[update.request_id]
        samples = []
        for index, seq in enumerate(update.samples):
            sample = _sample_delta(index, seq, sent)
            if sample is not None:
                samples.append(sample)
        first = update.first
        cached = first.num_cached_tokens
        if cached == sent.num_cached_tokens:
            if not samples and not update.finished:
                return None
            return RequestDelta(update.request_id, samples, update.finished)
        is_first = sent.num_cached_tokens is None
        sent.num_cached_tokens = cached
        prompt_logprobs = None
        if is_first and first.prompt_logprobs is not None:
            prompt_logprobs = [None if e is None else _wire(e) for e in first.prompt_logprobs]
        return RequestDelta(update.request_id, samples, update.finished, cached, prompt_logprobs)


def _sample_delta(index: int, seq: Sequence, sent: _Sent) -> SampleDelta | None:
    if sent.finished and index in sent.finished:
        return None
    start = sent.num_tokens.get(index, 0)
    prompt_len = seq.num_prompt_tokens
    num_output = len(seq.token_ids) - prompt_len
    reason = seq.finish_reason
    if num_output == start and reason is None:
        return None
    sent.num_tokens[index] = num_output
    if reason is not None:
        sent.finished.add(index)
    new_ids = seq.token_ids[prompt_len + start :]
    if seq.logprobs is None:
        return SampleDelta(index, new_ids, seq.cumulative_logprob, None, reason, seq.stop_reason)
    logprobs = [_wire(entry) for entry in seq.logprobs[start:]]
    return SampleDelta(index, new_ids, seq.cumulative_logprob, logprobs, reason, seq.stop_reason)


def _wire(entry: dict[int, Logprob]) -> TokenLogprobs:
    return TokenLogprobs(
        list(entry), [lp.logprob for lp in entry.values()], [lp.rank for lp in entry.values()]
    )
