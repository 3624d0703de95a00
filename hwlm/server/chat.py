"""POST /v1/chat/completions as an ``EndpointShape``: the messages (and tools) through the chat
template, one engine request with ``n`` samples; a stream opens with the assistant's role for
every choice. Output constraints (``response_format``, ``structured_outputs``, ``guided_*``)
and forced tool calls become the request's grammar; each choice's output becomes a message
(``hwlm.server.chat_message``: reasoning, tool calls, content)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hwlm.outputs import RequestOutput
from hwlm.server.chat_message import MessageFormat, MessageStream, whole_message
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
from hwlm.server.reasoning import ReasoningFormat, ReasoningStart
from hwlm.server.structured_request import (
    Constraint,
    check_constraint,
    conflict_with_tools,
    constrain,
    request_constraint,
)
from hwlm.server.tools.choice import ToolPlan, ToolSettings, plan_tools


@dataclass(frozen=True)
class ChatSettings:
    """The server's chat options: ``chat_template`` (Jinja text replacing the tokenizer's),
    the tool flags, and the ``--reasoning-parser`` format (None: none)."""

    chat_template: str | None = None
    tools: ToolSettings = field(default_factory=ToolSettings)
    reasoning: ReasoningFormat | None = None


class ChatShape:
    """The chat completions API's request and response shapes, for one request."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        request: ChatCompletionRequest,
        model: str,
        chat_template: str | None = None,
        settings: ChatSettings | None = None,
    ) -> None:
        self.request = request
        self.model = model
        self.settings = settings or ChatSettings(chat_template)
        self.chat_template = chat_template or self.settings.chat_template
        self._top_n = (request.top_logprobs or 0) if request.logprobs else None
        self.streams_every_token = self._top_n is not None
        self._format = MessageFormat()
        self._streams: dict[int, MessageStream] = {}  # per choice index

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
        tools = plan_tools(
            request.tools, request.tool_choice, request.parallel_tool_calls, self.settings.tools
        )
        constraint = _constraint(request, tools)
        text = apply_chat_template(
            seam.tokenizer,
            request.messages,
            request.add_generation_prompt,
            self.chat_template,
            tools.tools,
            request.chat_template_kwargs,
        )
        token_ids = await seam.tokenize(text, add_special_tokens=False)  # the template has them
        check_context_length(len(token_ids), max_tokens, seam.max_model_len, "messages")
        reasoning = self.settings.reasoning
        start = reasoning.start_for_prompt(text) if reasoning else ReasoningStart.AFTER
        if constraint is not None:
            after = None  # with reasoning, the constraint applies to the answer after it
            if reasoning is not None and start is not ReasoningStart.AFTER:
                after = await seam.tokenize(reasoning.end, add_special_tokens=False)
            constrain(params, constraint, after)
            await check_constraint(params, constraint, seam.tokenizer)
        elif tools.tool_format is not None and tools.tool_format.needs_special_tokens:
            params.skip_special_tokens = False  # the format's markers are special tokens
        self._format = MessageFormat(
            reasoning, start, request.include_reasoning, tools.tool_format, tools.max_calls
        )
        return RequestPlan([Prompt(token_ids, text)], params, "messages")

    async def accepted(self, seam: Seam) -> None:
        return None

    def opening_choices(self) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [_choice(i, "delta", role, None, None, None) for i in range(self.request.n)]

    def chunk_choice(self, update: ChoiceUpdate) -> dict[str, Any]:
        stream = self._streams.get(update.index)
        if stream is None:
            stream = self._streams[update.index] = MessageStream(self._format)
        delta, finish_reason = stream.update(update.delta, update.finish_reason)
        return {
            "index": update.index,
            "delta": delta,
            "logprobs": self._logprobs(update),
            "finish_reason": finish_reason,
            "stop_reason": update.stop_reason,
        }

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        (output,) = outputs
        choices = []
        for i in range(len(output.outputs)):
            whole = whole_choice(i, 0, output, i)
            message, finish_reason = whole_message(self._format, whole.delta, whole.finish_reason)
            logprobs = self._logprobs(whole)
            choices.append(
                _choice(i, "message", message, logprobs, finish_reason, whole.stop_reason)
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


def _constraint(request: ChatCompletionRequest, tools: ToolPlan) -> Constraint | None:
    """The request's output constraint: its own, or the schema of forced tool calls."""
    constraint = request_constraint(request.constraint_fields())
    if tools.schema is None:
        return constraint
    choice = request.tool_choice if isinstance(request.tool_choice, str) else "(a function)"
    conflict_with_tools(constraint, choice)
    return Constraint("json", tools.schema, "tools")


def _choice(
    index: int,
    key: str,
    message: dict[str, Any],
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
