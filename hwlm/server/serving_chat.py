"""POST /v1/chat/completions: the chat template, then one engine request with ``n`` samples."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from hwlm.outputs import CompletionOutput
from hwlm.server.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from hwlm.server.chat_utils import apply_chat_template
from hwlm.server.choice_stream import ChoiceTracker
from hwlm.server.common import (
    check_context_length,
    check_logprobs,
    check_model,
    sampling_params,
    usage,
)
from hwlm.server.errors import APIError
from hwlm.server.logprobs import chat_logprobs, prompt_logprobs
from hwlm.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    now,
    random_id,
)
from hwlm.server.streaming import (
    SSE_DONE,
    abort_all,
    add_requests,
    cancel_on_disconnect,
    final_outputs,
    merge_streams,
    sse,
)

logger = logging.getLogger(__name__)


async def create_chat_completion(
    engine: AsyncLLMEngine,
    served_model_name: str,
    request: ChatCompletionRequest,
    raw: Request,
    chat_template: str | None = None,
) -> Response:
    check_model(request.model, served_model_name)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError("top_logprobs needs logprobs to be true", param="top_logprobs")
    check_logprobs(request.top_logprobs, "top_logprobs", engine.max_logprobs)
    check_logprobs(request.prompt_logprobs, "prompt_logprobs", engine.max_logprobs, True)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    max_tokens = request.max_completion_tokens
    if max_tokens is None:
        max_tokens = request.max_tokens
    params = sampling_params(request, max_tokens, logprobs, engine.sampling_defaults)
    text = apply_chat_template(
        engine.tokenizer, request.messages, request.add_generation_prompt, chat_template
    )
    token_ids = await engine.tokenize(text, add_special_tokens=False)  # the template has them
    check_context_length(len(token_ids), max_tokens, engine.max_model_len, "messages")
    prompt = {"prompt": text, "prompt_token_ids": token_ids}
    request_id = random_id("chatcmpl")
    streams = await add_requests(
        engine, request_id, [prompt], params, stream=request.stream, param="messages"
    )
    if request.stream:
        return StreamingResponse(
            _stream(served_model_name, request, request_id, streams),
            media_type="text/event-stream",
            background=BackgroundTask(abort_all, streams),  # runs even if never iterated
        )
    try:
        outputs = await cancel_on_disconnect(raw, final_outputs(streams))
    finally:
        abort_all(streams)
    top_n = (request.top_logprobs or 0) if request.logprobs else None
    choices = [
        ChatChoice(
            index=i,
            message=ChatResponseMessage(content=completion.text),
            logprobs=_logprobs(completion, 0, top_n),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        for i, completion in enumerate(outputs[0].outputs)
    ]
    response = ChatCompletionResponse(
        id=request_id,
        model=served_model_name,
        choices=choices,
        usage=usage(outputs),
        prompt_logprobs=prompt_logprobs(outputs[0].prompt_logprobs),
    )
    return JSONResponse(response.model_dump())


def _logprobs(completion: CompletionOutput, start: int, top_n: int | None) -> ChatLogprobs | None:
    if top_n is None or completion.logprobs is None:
        return None
    end = len(completion.token_ids)
    return chat_logprobs(completion.token_ids[start:end], completion.logprobs[start:end], top_n)


async def _stream(
    model: str, request: ChatCompletionRequest, request_id: str, streams: list[RequestStream]
) -> AsyncIterator[str]:
    created = now()
    top_n = (request.top_logprobs or 0) if request.logprobs else None
    exclude = None if request.include_usage else {"usage"}

    def chunk(choices: list[ChatStreamChoice]) -> str:
        body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices)
        return sse(body.model_dump_json(exclude=exclude))

    tracker = ChoiceTracker(request.n, token_updates=top_n is not None)
    try:
        for i in range(request.n):
            role = DeltaMessage(role="assistant", content="")
            yield chunk([ChatStreamChoice(index=i, delta=role)])
        last = None
        async for _, output in merge_streams(streams):
            last = output
            for update in tracker.updates(0, output):
                completion = update.completion
                choice = ChatStreamChoice(
                    index=update.index,
                    delta=DeltaMessage(content=update.delta) if update.delta else DeltaMessage(),
                    logprobs=_logprobs(completion, update.start_token, top_n),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                )
                yield chunk([choice])
        if request.include_usage and last is not None:
            body = ChatCompletionChunk(
                id=request_id, created=created, model=model, choices=[], usage=usage([last])
            )
            yield sse(body.model_dump_json())
    except EngineDeadError as exc:
        yield sse(APIError(str(exc), 503).json())
    except Exception:
        logger.exception("%s: streaming failed", request_id)
        yield sse(APIError("internal server error", 500).json())
    yield SSE_DONE
