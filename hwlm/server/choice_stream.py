"""Choices from a request's outputs: what each choice still has to send.

A request's outputs are cumulative (the whole text so far, per sample); a stream sends only what is
new. One response may carry several choices: ``n`` samples per prompt, and for completions several
prompts, so choice ``prompt_index * n + sample_index`` is tracked separately, and a choice that has
finished is sent no more while its siblings continue. Whatever arrived since a choice's last update
goes into its next one, however many engine steps that spans.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from hwlm.outputs import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)


def text_delta(sent: str, text: str) -> str:
    """What to send after ``sent`` so that the client ends up with ``text``.

    ``text`` normally extends ``sent``; if the final full decode differs from the incremental
    text (it can around multi-byte characters), send what follows their common prefix."""
    if text.startswith(sent):
        return text[len(sent) :]
    common = 0
    for a, b in zip(sent, text, strict=False):
        if a != b:
            break
        common += 1
    logger.debug("streamed text diverged from the final text after %d characters", common)
    return text[common:]


@dataclass
class _Sent:
    text: str = ""  # engine text sent so far
    chars: int = 0  # characters sent so far (deltas may diverge from the text; see text_delta)
    num_tokens: int = 0
    started: bool = False
    finished: bool = False


@dataclass(frozen=True)
class ChoiceUpdate:
    """New content for one choice: ``delta`` text and tokens ``[start_token, len(token_ids))``
    of ``completion``, a sample of ``output``, the request of prompt ``prompt_index``."""

    index: int
    prompt_index: int
    output: RequestOutput
    completion: CompletionOutput
    delta: str
    start_token: int
    chars_before: int  # characters of this choice sent before ``delta``
    first: bool  # nothing was sent for this choice before


def whole_choice(index: int, prompt_index: int, output: RequestOutput, sample: int) -> ChoiceUpdate:
    """Sample ``sample`` of a finished ``output`` as one update (a non-streamed choice)."""
    completion = output.outputs[sample]
    return ChoiceUpdate(index, prompt_index, output, completion, completion.text, 0, 0, True)


class ChoiceTracker:
    """Per-choice bookkeeping of a streamed response. With ``token_updates`` a new token is worth
    a chunk even when it adds no text (its logprobs must be sent)."""

    def __init__(self, n: int, token_updates: bool) -> None:
        self.n = n
        self.token_updates = token_updates
        self._sent: dict[int, _Sent] = {}

    def updates(self, prompt_index: int, output: RequestOutput) -> Iterator[ChoiceUpdate]:
        for completion in output.outputs:
            index = prompt_index * self.n + completion.index
            sent = self._sent.setdefault(index, _Sent())
            if sent.finished:
                continue
            delta = text_delta(sent.text, completion.text)
            new_tokens = len(completion.token_ids) > sent.num_tokens
            if not (delta or completion.finish_reason or (new_tokens and self.token_updates)):
                continue
            yield ChoiceUpdate(
                index,
                prompt_index,
                output,
                completion,
                delta,
                sent.num_tokens,
                sent.chars,
                not sent.started,
            )
            sent.started = True
            sent.text, sent.num_tokens = completion.text, len(completion.token_ids)
            sent.chars += len(delta)
            sent.finished = completion.finish_reason is not None
