"""POST /v1/chat/completions as an ``EndpointShape``: the messages through the chat template, one
engine request with ``n`` samples; a stream opens with the assistant's role for every choice."""

from __future__ import annotations

from typing import Any

from hwlm.outputs import RequestOutput
from hwlm.server.chat_utils import apply_chat_template
from hwlm.server.choice_stream import ChoiceUpdate, whole_choice
from hwlm.server.common import (
    check_context_length,
    check_logprobs,
    check_model,
    sampling_params,
    usage,
)
from hwlm.server.endpoint import RequestPlan
from hwlm.server.engine_seam import Prompt, Seam
from hwlm.server.errors import APIError
from hwlm.server.logprobs import chat_logprobs, prompt_logprobs
from hwlm.server.protocol import ChatCompletionRequest


class ChatShape:
    """The chat completions API's request and response shapes, for one request."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(
        self, request: ChatCompletionRequest, model: str, chat_template: str | None = None
    ) -> None:
        self.request = request
        self.model = model
        self.chat_template = chat_template  # Jinja text replacing the tokenizer's template
        self._top_n = (request.top_logprobs or 0) if request.logprobs else None
        self.streams_every_token = self._top_n is not None

    async def plan(self, seam: Seam) -> RequestPlan:
        request = self.request
        check_model(request.model, self.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError("top_logprobs needs logprobs to be true", param="top_logprobs")
        check_logprobs(request.top_logprobs, "top_logprobs", seam.max_logprobs)
        check_logprobs(request.prompt_logprobs, "prompt_logprobs", seam.max_logprobs, True)
        max_tokens = request.max_completion_tokens
        if max_tokens is None:
            max_tokens = request.max_tokens
        params = sampling_params(request, max_tokens, self._top_n, seam.sampling_defaults)
        text = apply_chat_template(
            seam.tokenizer, request.messages, request.add_generation_prompt, self.chat_template
        )
        token_ids = await seam.tokenize(text, add_special_tokens=False)  # the template has them
        check_context_length(len(token_ids), max_tokens, seam.max_model_len, "messages")
        return RequestPlan([Prompt(token_ids, text)], params, "messages")

    async def accepted(self, seam: Seam) -> None:
        return None

    def opening_choices(self) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [_choice(i, "delta", role, None, None, None) for i in range(self.request.n)]

    def chunk_choice(self, update: ChoiceUpdate) -> dict[str, Any]:
        return {
            "index": update.index,
            "delta": {"content": update.delta} if update.delta else {},
            "logprobs": self._logprobs(update),
            "finish_reason": update.finish_reason,
            "stop_reason": update.stop_reason,
        }

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        (output,) = outputs
        choices = []
        for i in range(len(output.outputs)):
            whole = whole_choice(i, 0, output, i)
            message = {"role": "assistant", "content": whole.delta}
            logprobs = self._logprobs(whole)
            choices.append(
                _choice(i, "message", message, logprobs, whole.finish_reason, whole.stop_reason)
            )
        return {
            "choices": choices,
            "usage": usage(outputs),
            "prompt_logprobs": prompt_logprobs(output.prompt_logprobs),
        }

    def _logprobs(self, update: ChoiceUpdate) -> dict[str, Any] | None:
        """Logprobs of the update's tokens (None if not asked)."""
        if self._top_n is None or update.logprobs is None:
            return None
        start, end = update.start_token, update.end_token
        return chat_logprobs(update.token_ids[start:end], update.logprobs[start:end], self._top_n)


def _choice(
    index: int,
    key: str,
    message: dict[str, str],
    logprobs: dict[str, Any] | None,
    finish_reason: str | None,
    stop_reason: int | str | None,
) -> dict[str, Any]:
    """A choice: its ``message`` (a response's) or ``delta`` (a chunk's) under ``key``."""
    return {
        "index": index,
        key: message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
