"""The API side's half of a request's outputs: deltas in, vLLM's cumulative RequestOutputs out.

The engine core sends token ids; text is made here, with the same incremental detokenizer and
rules as ``LLMEngine``, so a request's outputs read exactly as ``LLM.generate`` and the in-thread
engine give them:

* while a streamed sample runs, its text is the incremental text less the characters a stop
  string could still claim (``SamplingParams.output_text_buffer_length``);
* a sample the engine stopped on a stop string (``stop_reason`` is that string) ends where the
  engine's check put it: before the string, or after it with ``include_stop_str_in_output``;
* any other finished sample's text is a full decode of its tokens;
* logprob entries get their ``decoded_token``s, as the engine would (with ``detokenize``).

``add`` gives the whole output after each delta. A reader that only wants what is new (the
server's streams: one event per step, per request) folds deltas with ``fold`` instead and reads
each sample's state (``samples``): its tokens and logprobs (lists that only grow), and with
``track_new_text`` its new text through ``AssembledSample.take_text``, never copying what it has
already read.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

from hwlm.engine.client import EngineClient
from hwlm.engine.messages import RequestDelta, SampleDelta, TokenLogprobs
from hwlm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from hwlm.sampling.stop_checker import find_stop_string
from hwlm.sampling_params import SamplingParams
from hwlm.text.tokenizer import Detokenizer, decode_tokens, new_detokenizer


class RequestOutputAssembler:
    """Folds one request's deltas into cumulative ``RequestOutput``s (``add``)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        tokenizer: Any,
        *,
        prompt: str | None = None,
        stream: bool = True,
        track_new_text: bool = False,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.stream = stream
        self.track_new_text = track_new_text  # keep each sample's text not yet taken
        # Characters of a running sample's text held back (a stop string could still claim them).
        self.text_buffer_length = params.output_text_buffer_length
        self.finished = False
        self.num_cached_tokens = 0
        self.prompt_logprobs: PromptLogprobs | None = None
        self._samples: dict[int, AssembledSample] = {}
        self.samples: list[AssembledSample] = []  # in index order
        self._decoded: dict[int, str] | None = None  # token id -> its text (logprobs)

    def add(self, delta: RequestDelta) -> RequestOutput:
        """Apply ``delta``; the request's whole output so far."""
        self.fold(delta)
        return self.output()

    def fold(self, delta: RequestDelta) -> None:
        """Apply ``delta`` (``output()`` or ``samples`` read the result)."""
        for sample_delta in delta.samples:
            sample = self._samples.get(sample_delta.index)
            if sample is None:
                sample = self._new_sample(sample_delta.index)
            sample.extend(sample_delta)
        if delta.num_cached_tokens is not None:
            self.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = [
                None if e is None else self.logprob_entry(e) for e in delta.prompt_logprobs
            ]
        self.finished = delta.finished

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[sample.completion() for sample in self.samples],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
        )

    def _new_sample(self, index: int) -> AssembledSample:
        sample = self._samples[index] = AssembledSample(self, index)
        self.samples.append(sample)
        if len(self.samples) > 1 and self.samples[-2].index > index:
            self.samples.sort(key=lambda s: s.index)
        return sample

    def logprob_entry(self, wire: TokenLogprobs) -> dict[int, Logprob]:
        entry = {
            token_id: Logprob(logprob, rank)
            for token_id, logprob, rank in zip(
                wire.token_ids, wire.logprobs, wire.ranks, strict=True
            )
        }
        if self.params.detokenize:
            decoded = self._decoded
            if decoded is None:
                decoded = self._decoded = _decoded_tokens(self.tokenizer)
            for token_id, lp in entry.items():
                text = decoded.get(token_id)
                if text is None:
                    text = decoded[token_id] = self.tokenizer.decode([token_id])
                lp.decoded_token = text
        return entry


# tokenizer -> token id -> tokenizer.decode([token id]): a token's text never changes, and
# logprobs ask for the same few thousand tokens' texts again and again.
_DECODED: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def _decoded_tokens(tokenizer: Any) -> dict[int, str]:
    """The texts of single tokens decoded so far with ``tokenizer`` (a fresh dict for a
    tokenizer that cannot be weakly referenced)."""
    try:
        return _DECODED.setdefault(tokenizer, {})
    except TypeError:
        return {}


class AssembledSample:
    """One sample's tokens, logprobs and text so far."""

    def __init__(self, owner: RequestOutputAssembler, index: int) -> None:
        self.owner = owner
        self.index = index
        params = owner.params
        self.token_ids: list[int] = []
        self.logprobs: SampleLogprobs | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer: Detokenizer | None = None
        if params.detokenize and (owner.stream or params.stop_strings):
            self.detokenizer = new_detokenizer(
                owner.tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens
            )
        self.last_new_text = ""  # the text the latest token completed
        self.final_text: str | None = None
        # With the owner's track_new_text: the detokenizer's text not yet taken (take_text).
        self._untaken: list[str] | None = [] if owner.track_new_text else None
        self.text_length = 0  # characters of the detokenizer's text
        self.taken_length = 0  # characters of it take_text has returned

    def extend(self, delta: SampleDelta) -> None:
        detokenizer = self.detokenizer
        if detokenizer is None:
            self.token_ids.extend(delta.token_ids)
        else:
            untaken = self._untaken
            for token_id in delta.token_ids:
                self.token_ids.append(token_id)
                piece = self.last_new_text = detokenizer.add(token_id)
                if piece:
                    self.text_length += len(piece)
                    if untaken is not None:
                        untaken.append(piece)
        if self.logprobs is not None and delta.logprobs is not None:
            self.logprobs.extend(self.owner.logprob_entry(e) for e in delta.logprobs)
        self.cumulative_logprob = delta.cumulative_logprob
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
            self.final_text = self._final_text()

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.final_text if self.final_text is not None else self._running_text(),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def take_text(self) -> str:
        """The running text (``completion().text`` while the sample runs: the characters a stop
        string could still claim held back) added since the last call (needs the owner's
        ``track_new_text``)."""
        visible = self.text_length - self.owner.text_buffer_length
        count = visible - self.taken_length
        untaken = self._untaken
        if count <= 0 or not untaken:
            return ""
        text = untaken[0] if len(untaken) == 1 else "".join(untaken)
        untaken.clear()
        if count < len(text):
            text, rest = text[:count], text[count:]
            untaken.append(rest)
        self.taken_length = visible
        return text

    def taken_text(self) -> str:
        """All that ``take_text`` has returned."""
        if self.detokenizer is None or not self.taken_length:
            return ""
        return self.detokenizer.text[: self.taken_length]

    def _running_text(self) -> str:
        if self.detokenizer is None:
            return ""
        text = self.detokenizer.text
        return text[: max(0, len(text) - self.owner.text_buffer_length)]

    def _final_text(self) -> str:
        params = self.owner.params
        if not params.detokenize:
            return ""
        if isinstance(self.stop_reason, str) and self.detokenizer is not None:
            text = self.detokenizer.text
            found = find_stop_string(
                text,
                len(self.last_new_text),
                params.stop_strings,
                params.include_stop_str_in_output,
            )
            if found is not None:
                return text[: found[1]]
        return decode_tokens(
            self.owner.tokenizer,
            self.token_ids,
            params.skip_special_tokens,
            params.spaces_between_special_tokens,
        )


async def request_outputs(
    client: EngineClient,
    request_id: str,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    tokenizer: Any,
    *,
    prompt: str | None = None,
    stream: bool = True,
) -> AsyncIterator[RequestOutput]:
    """A request's cumulative outputs through ``client`` (as ``AsyncLLMEngine.generate`` gives
    them); errors of ``add_request`` are raised before the first. Stopping early aborts it."""
    assembler = RequestOutputAssembler(
        request_id, prompt_token_ids, params, tokenizer, prompt=prompt, stream=stream
    )
    async for delta in client.generate(request_id, prompt_token_ids, params, stream=stream):
        yield assembler.add(delta)
