"""Pydantic models of the OpenAI request bodies (with vLLM's extra fields) and of the small
response bodies; the generation responses are built as dicts by their endpoint shapes
(``hwlm.server.completions``, ``hwlm.server.chat``).

Unknown request fields are ignored, as OpenAI and vLLM do. Sampling fields go to ``SamplingParams``
under vLLM's names; fields hwlm cannot honour (suffix, functions, ...) are accepted only at their
neutral value: ``unsupported()`` names the first one set otherwise, and the server answers 400
rather than silently ignoring it. Value ranges are checked by ``SamplingParams`` itself.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hwlm.sampling_params import SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Requests -----------------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingRequest(OpenAIModel):
    """The fields that completions and chat completions share."""

    model: str | None = None  # None: the served model
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    # --scheduling-policy priority: lower runs first (under fcfs it must be 0); a 64-bit integer.
    priority: int = Field(0, ge=-(2**63), le=2**63 - 1)
    best_of: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Output constraints (``hwlm.server.structured_request`` maps them).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted; hwlm has one grammar engine
    guided_whitespace_pattern: str | None = None

    def constraint_fields(self) -> dict[str, Any]:
        """The fields that may constrain the output, by name."""
        return {name: getattr(self, name) for name in CONSTRAINT_FIELDS}

    def unsupported(self) -> tuple[str, str] | None:
        """(message, field) for the first field set to something hwlm cannot do, else None."""
        if self.stream and self.prompt_logprobs is not None:
            return "prompt_logprobs are not available when stream=true", "prompt_logprobs"
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        defaults: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """The request's SamplingParams; fields it leaves unset take ``defaults`` (the model's
        generation_config), then SamplingParams' own. Raises ValueError for out-of-range
        values (SamplingParams validates)."""
        values: dict[str, Any] = {
            **{name: getattr(self, name) for name in _PASSED_THROUGH},
            "max_tokens": max_tokens,
            "logprobs": logprobs,
        }
        for name, value in (defaults or {}).items():
            if values.get(name) is None:
                values[name] = value
        kwargs = {k: v for k, v in values.items() if v is not None}
        kwargs["max_tokens"] = values["max_tokens"]  # None: up to max_model_len
        return SamplingParams(**kwargs)


# Request fields passed to SamplingParams under the same name (those it has).
_PASSED_THROUGH = tuple(
    name
    for name in (
        "n",
        "best_of",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "bad_words",
        "allowed_token_ids",
        "prompt_logprobs",
        "min_tokens",
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
    )  # fmt: skip
    if name in {f.name for f in dataclasses.fields(SamplingParams)}
)


# The request fields that may constrain the output.
CONSTRAINT_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix is not supported", "suffix"
        return super().unsupported()


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result's call


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None  # None: auto with tools, else none
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None  # OpenAI's deprecated form of tools
    # vLLM extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # with --reasoning-parser: return reasoning_content

    def unsupported(self) -> tuple[str, str] | None:
        if self.functions:
            return "functions (deprecated) is not supported; give tools instead", "functions"
        return super().unsupported()


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize body: a ``prompt``, or chat ``messages`` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


# Responses ----------------------------------------------------------------------------------------


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(OpenAIModel):
    prompt: str


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "hwlm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo
