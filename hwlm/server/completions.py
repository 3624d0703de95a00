"""POST /v1/completions as an ``EndpointShape``: one engine request per prompt, ``n`` choices per
prompt, choice ``prompt_index * n + i`` holding sample ``i`` of that prompt (as OpenAI and vLLM
number them).

``echo`` puts the prompt's text before the completion and, with ``logprobs``, the prompt tokens'
logprobs before the completion's (the first prompt token, which nothing predicts, has null
logprobs); ``max_tokens: 0`` with echo scores the prompt without generating, as evaluation
harnesses ask. The echoed text is known before the first output is read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hwlm.outputs import RequestOutput
from hwlm.server.choice_stream import ChoiceUpdate, whole_choice
from hwlm.server.common import (
    check_context_length,
    check_logprobs,
    check_model,
    sampling_params,
    usage,
    usage_counts,
)
from hwlm.server.endpoint import RequestPlan
from hwlm.server.engine_seam import Prompt, Seam
from hwlm.server.errors import APIError
from hwlm.server.logprobs import completion_logprobs, concat_logprobs, prompt_logprobs
from hwlm.server.protocol import CompletionRequest
from hwlm.server.structured_request import check_constraint, constrain, request_constraint

RawPrompt = str | list[int]


@dataclass(frozen=True)
class _Echo:
    text: str  # the prompt's text, put before the completion
    unscored: dict[int, str]  # the first prompt token's text (with logprobs)


class CompletionShape:
    """The completions API's request and response shapes, for one request."""

    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, request: CompletionRequest, model: str) -> None:
        self.request = request
        self.model = model
        self.streams_every_token = request.logprobs is not None
        self._echo_only = request.echo and request.max_tokens == 0
        self._prompts: list[Prompt] = []
        self._echoes: list[_Echo] = []  # per prompt, with echo
        # Built once per prompt, shared by its n choices (they are the same for every sample).
        self._echo_logprobs: dict[int, dict[str, Any] | None] = {}
        self._prompt_logprobs_json: dict[int, list[dict[str, Any] | None] | None] = {}

    async def plan(self, seam: Seam) -> RequestPlan:
        request = self.request
        check_model(request.model, self.model)
        check_logprobs(request.logprobs, "logprobs", seam.max_logprobs)
        check_logprobs(request.prompt_logprobs, "prompt_logprobs", seam.max_logprobs, True)
        if self._echo_only and request.stream:
            raise APIError("max_tokens=0 (echo only) needs stream=false", param="max_tokens")
        max_tokens = 1 if self._echo_only else request.max_tokens  # the token is dropped
        params = sampling_params(request, max_tokens, request.logprobs, seam.sampling_defaults)
        constraint = request_constraint(request.constraint_fields())
        if constraint is not None:
            constrain(params, constraint)
            await check_constraint(params, constraint, seam.tokenizer)
        if request.echo and request.logprobs is not None:  # echoed logprobs are the prompt's
            params.prompt_logprobs = max(params.prompt_logprobs or 0, request.logprobs)
        prompts = await _tokenized(seam, _raw_prompts(request.prompt), request.max_tokens)
        self._prompts = prompts
        return RequestPlan(prompts, params, "prompt")

    async def accepted(self, seam: Seam) -> None:
        if self.request.echo:  # only now: a prompt the engine rejects may not detokenize
            with_logprobs = self.request.logprobs is not None
            echoes = (_echo(seam, p, with_logprobs) for p in self._prompts)
            self._echoes = list(await asyncio.gather(*echoes))

    def opening_choices(self) -> list[dict[str, Any]]:
        return []

    def chunk_choice(self, update: ChoiceUpdate) -> dict[str, Any]:
        echo = self._echoes[update.prompt_index] if self.request.echo else None
        if echo is None:
            text, offset = update.delta, update.chars_before
        else:
            text = echo.text + update.delta if update.first else update.delta
            offset = len(echo.text) + update.chars_before
        logprobs = self._logprobs(update, offset)
        if echo is not None and update.first:
            logprobs = concat_logprobs(self._prompt_logprobs(echo, update), logprobs)
        return {
            "index": update.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": update.finish_reason,
            "stop_reason": update.stop_reason,
        }

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        n = self.request.n
        choices = [
            self._final_choice(whole_choice(prompt_index * n + i, prompt_index, output, i))
            for prompt_index, output in enumerate(outputs)
            for i in range(len(output.outputs))
        ]
        counts = usage(outputs)
        if self._echo_only:
            counts = usage_counts(counts["prompt_tokens"], 0)
        return {"choices": choices, "usage": counts}

    def _final_choice(self, update: ChoiceUpdate) -> dict[str, Any]:
        if self._echo_only:
            echo = self._echoes[update.prompt_index]
            choice: dict[str, Any] = {
                "index": update.index,
                "text": echo.text,
                "logprobs": self._prompt_logprobs(echo, update),
                "finish_reason": "length",
                "stop_reason": None,
            }
        else:
            choice = self.chunk_choice(update)
        asked = self.request.prompt_logprobs is not None
        choice["prompt_logprobs"] = self._prompt_logprobs_of(update) if asked else None
        return choice

    def _logprobs(self, update: ChoiceUpdate, text_offset: int) -> dict[str, Any] | None:
        """Logprobs of the update's tokens (None if not asked)."""
        top_n = self.request.logprobs
        if top_n is None or update.logprobs is None:
            return None
        start, end = update.start_token, update.end_token
        return completion_logprobs(
            update.token_ids[start:end], update.logprobs[start:end], top_n, text_offset
        )

    def _prompt_logprobs_of(self, update: ChoiceUpdate) -> list[dict[str, Any] | None] | None:
        """vLLM's ``prompt_logprobs`` of the update's prompt, built once per prompt."""
        index = update.prompt_index
        if index not in self._prompt_logprobs_json:
            self._prompt_logprobs_json[index] = prompt_logprobs(update.prompt_logprobs)
        return self._prompt_logprobs_json[index]

    def _prompt_logprobs(self, echo: _Echo, update: ChoiceUpdate) -> dict[str, Any] | None:
        """The echoed prompt tokens' logprobs (None unless asked for and computed), built once
        per prompt."""
        index = update.prompt_index
        if index not in self._echo_logprobs:
            self._echo_logprobs[index] = self._build_prompt_logprobs(echo, update)
        return self._echo_logprobs[index]

    def _build_prompt_logprobs(self, echo: _Echo, update: ChoiceUpdate) -> dict[str, Any] | None:
        top_n = self.request.logprobs
        if top_n is None or update.prompt_logprobs is None:
            return None
        return completion_logprobs(
            update.prompt_token_ids, update.prompt_logprobs, top_n, 0, echo.unscored
        )


def _raw_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[RawPrompt]:
    """The request's prompts: a string, a token-id list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


async def _tokenized(seam: Seam, prompts: list[RawPrompt], max_tokens: int | None) -> list[Prompt]:
    """Each prompt with its token ids, after checking that it fits the context window."""
    texts = [p for p in prompts if isinstance(p, str)]
    token_ids = iter(await asyncio.gather(*(seam.tokenize(t) for t in texts)))
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(Prompt(next(token_ids), prompt))
        else:
            out.append(Prompt(prompt))
        check_context_length(len(out[-1].token_ids), max_tokens, seam.max_model_len, "prompt")
    return out


async def _echo(seam: Seam, prompt: Prompt, with_logprobs: bool) -> _Echo:
    text = prompt.text if prompt.text is not None else await seam.detokenize(prompt.token_ids)
    unscored = {}
    if with_logprobs and prompt.token_ids:
        first = prompt.token_ids[0]
        unscored[first] = await seam.detokenize([first])
    return _Echo(text, unscored)
