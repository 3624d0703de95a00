"""Per-step deltas from the engine's cumulative outputs.

``LLMEngine.step()`` reports a streamed request after every token with everything it has so
far; ``DeltaTracker`` remembers what each request's samples have already sent and keeps only
what is new, in wire form (``hwlm.engine.messages.RequestDelta``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hwlm.engine.messages import RequestDelta, SampleDelta, TokenLogprobs
from hwlm.outputs import CompletionOutput, Logprob, RequestOutput


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

    def delta(self, output: RequestOutput) -> RequestDelta | None:
        """What ``output`` adds to the request's earlier outputs; None if nothing (or if the
        request is not tracked: aborted meanwhile). A finished request is forgotten."""
        sent = self._sent.get(output.request_id)
        if sent is None:
            return None
        if output.finished:
            del self._sent[output.request_id]
        samples = [d for c in output.outputs if (d := _sample_delta(c, sent)) is not None]
        first = sent.num_cached_tokens is None
        cached = (
            None if output.num_cached_tokens == sent.num_cached_tokens else output.num_cached_tokens
        )
        sent.num_cached_tokens = output.num_cached_tokens
        if not samples and not output.finished and cached is None:
            return None
        prompt_logprobs = None
        if first and output.prompt_logprobs is not None:
            prompt_logprobs = [None if e is None else _wire(e) for e in output.prompt_logprobs]
        return RequestDelta(output.request_id, samples, output.finished, cached, prompt_logprobs)


def _sample_delta(completion: CompletionOutput, sent: _Sent) -> SampleDelta | None:
    index = completion.index
    if index in sent.finished:
        return None
    start = sent.num_tokens.get(index, 0)
    new_ids = completion.token_ids[start:]
    finishing = completion.finish_reason is not None
    if not new_ids and not finishing:
        return None
    sent.num_tokens[index] = len(completion.token_ids)
    if finishing:
        sent.finished.add(index)
    logprobs = None
    if completion.logprobs is not None:
        logprobs = [_wire(entry) for entry in completion.logprobs[start:]]
    return SampleDelta(
        index,
        list(new_ids),
        completion.cumulative_logprob or 0.0,
        logprobs,
        completion.finish_reason,
        completion.stop_reason,
    )


def _wire(entry: dict[int, Logprob]) -> TokenLogprobs:
    return TokenLogprobs(
        list(entry), [lp.logprob for lp in entry.values()], [lp.rank for lp in entry.values()]
    )
