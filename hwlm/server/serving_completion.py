"""POST /v1/completions: one engine request per prompt; ``n`` choices per prompt, choice
``prompt_index * n + i`` holding sample ``i`` of that prompt (as OpenAI and vLLM number them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from hwlm.outputs import CompletionOutput, RequestOutput
from hwlm.server.async_engine import AsyncLLMEngine, EngineDeadError, PromptType, RequestStream
from hwlm.server.choice_stream import ChoiceTracker
from hwlm.server.common import (
    check_context_length,
    check_logprobs,
    check_model,
    sampling_params,
    usage,
)
from hwlm.server.echo import (
    ask_prompt_logprobs,
    concat_logprobs,
    echo_logprobs,
    echo_only,
    echo_text,
)
from hwlm.server.errors import APIError
from hwlm.server.logprobs import completion_logprobs, prompt_logprobs
from hwlm.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[PromptType]:
    """The request's prompts: a string, a token-id list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


async def _tokenized(
    engine: AsyncLLMEngine, prompts: list[PromptType], max_tokens: int | None
) -> list[PromptType]:
    """Each prompt with its token ids (one round trip to the engine thread for all), after
    checking that it fits the context window."""
    texts = [p for p in prompts if isinstance(p, str)]
    token_ids = iter(await asyncio.gather(*(engine.tokenize(t) for t in texts)))
    out: list[PromptType] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = next(token_ids)
            out.append({"prompt": prompt, "prompt_token_ids": ids})
        else:
            ids = prompt if isinstance(prompt, list) else []
            out.append(prompt)
        check_context_length(len(ids), max_tokens, engine.max_model_len, "prompt")
    return out


async def create_completion(
    engine: AsyncLLMEngine, served_model_name: str, request: CompletionRequest, raw: Request
) -> Response:
    check_model(request.model, served_model_name)
    check_logprobs(request.logprobs, "logprobs", engine.max_logprobs)
    check_logprobs(request.prompt_logprobs, "prompt_logprobs", engine.max_logprobs, True)
    if echo_only(request) and request.stream:
        raise APIError("max_tokens=0 (echo only) needs stream=false", param="max_tokens")
    max_tokens = 1 if echo_only(request) else request.max_tokens  # the token is dropped
    params = sampling_params(request, max_tokens, request.logprobs, engine.sampling_defaults)
    ask_prompt_logprobs(request, params)
    prompts = await _tokenized(engine, _prompts(request.prompt), request.max_tokens)
    request_id = random_id("cmpl")
    streams = await add_requests(engine, request_id, prompts, params, stream=request.stream)
    logger.debug("%s: %d prompt(s), stream=%s", request_id, len(prompts), request.stream)
    if request.stream:
        return StreamingResponse(
            _stream(engine, served_model_name, request, request_id, streams),
            media_type="text/event-stream",
            background=BackgroundTask(abort_all, streams),  # runs even if never iterated
        )
    try:
        outputs = await cancel_on_disconnect(raw, final_outputs(streams))
    finally:
        abort_all(streams)
    choices = [
        await _choice(engine, request, prompt_index * request.n + i, output, completion)
        for prompt_index, output in enumerate(outputs)
        for i, completion in enumerate(output.outputs)
    ]
    if request.prompt_logprobs is not None:
        for choice in choices:
            choice.prompt_logprobs = prompt_logprobs(
                outputs[choice.index // request.n].prompt_logprobs
            )
    tokens = usage(outputs)
    if echo_only(request):
        tokens.completion_tokens, tokens.total_tokens = 0, tokens.prompt_tokens
    response = CompletionResponse(
        id=request_id, model=served_model_name, choices=choices, usage=tokens
    )
    return JSONResponse(response.model_dump())


async def _choice(
    engine: AsyncLLMEngine,
    request: CompletionRequest,
    index: int,
    output: RequestOutput,
    completion: CompletionOutput,
) -> CompletionChoice:
    if not request.echo:
        logprobs = _logprobs(completion, 0, request.logprobs, 0)
        return CompletionChoice(
            index=index,
            text=completion.text,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
    prefix = await echo_text(engine, output)
    prompt_lp = await echo_logprobs(engine, output, request.logprobs)
    if echo_only(request):
        return CompletionChoice(
            index=index, text=prefix, logprobs=prompt_lp, finish_reason="length"
        )
    return CompletionChoice(
        index=index,
        text=prefix + completion.text,
        logprobs=concat_logprobs(
            prompt_lp, _logprobs(completion, 0, request.logprobs, len(prefix))
        ),
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )


def _logprobs(
    completion: CompletionOutput, start: int, top_n: int | None, text_offset: int
) -> CompletionLogprobs | None:
    """Logprobs of the completion's tokens from index ``start`` on (None if not requested)."""
    if top_n is None or completion.logprobs is None:
        return None
    end = len(completion.token_ids)
    return completion_logprobs(
        completion.token_ids[start:end], completion.logprobs[start:end], top_n, text_offset
    )


async def _stream(
    engine: AsyncLLMEngine,
    model: str,
    request: CompletionRequest,
    request_id: str,
    streams: list[RequestStream],
) -> AsyncIterator[str]:
    created = now()
    tracker = ChoiceTracker(request.n, token_updates=request.logprobs is not None)
    last: list[RequestOutput | None] = [None] * len(streams)
    echoes: dict[int, str] = {}  # prompt index -> its echoed text
    try:
        async for prompt_index, output in merge_streams(streams):
            last[prompt_index] = output
            if request.echo and prompt_index not in echoes:
                echoes[prompt_index] = await echo_text(engine, output)
            echo = echoes.get(prompt_index, "")
            for update in tracker.updates(prompt_index, output):
                completion = update.completion
                offset = len(echo) + update.chars_before  # where the delta starts
                logprobs = _logprobs(completion, update.start_token, request.logprobs, offset)
                if request.echo and update.first:
                    prompt_lp = await echo_logprobs(engine, output, request.logprobs)
                    logprobs = concat_logprobs(prompt_lp, logprobs)
                choice = CompletionChoice(
                    index=update.index,
                    text=(echo if update.first else "") + update.delta,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                )
                chunk = CompletionResponse(
                    id=request_id, created=created, model=model, choices=[choice]
                )
                yield sse(chunk.model_dump_json(exclude={"usage"}))
        if request.include_usage:
            finished = [o for o in last if o is not None]
            chunk = CompletionResponse(
                id=request_id, created=created, model=model, choices=[], usage=usage(finished)
            )
            yield sse(chunk.model_dump_json())
    except EngineDeadError as exc:
        yield sse(APIError(str(exc), 503).json())
    except Exception:
        logger.exception("%s: streaming failed", request_id)
        yield sse(APIError("internal server error", 500).json())
    yield SSE_DONE
