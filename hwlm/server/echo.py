"""``echo`` in completions: the prompt's text before the completion and, with ``logprobs``, the
prompt tokens' logprobs before the completion's (vLLM's behaviour; the first prompt token, which
nothing predicts, has null logprobs). ``max_tokens: 0`` with echo scores the prompt without
generating, as evaluation harnesses ask."""

from __future__ import annotations

from hwlm.outputs import RequestOutput
from hwlm.sampling_params import SamplingParams
from hwlm.server.async_engine import AsyncLLMEngine
from hwlm.server.logprobs import completion_logprobs
from hwlm.server.protocol import CompletionLogprobs, CompletionRequest


def echo_only(request: CompletionRequest) -> bool:
    """Echo the prompt and generate nothing (``max_tokens: 0``)."""
    return request.echo and request.max_tokens == 0


def ask_prompt_logprobs(request: CompletionRequest, params: SamplingParams) -> None:
    """Echo with logprobs needs the engine's prompt logprobs."""
    if request.echo and request.logprobs is not None:
        params.prompt_logprobs = max(params.prompt_logprobs or 0, request.logprobs)


async def echo_text(engine: AsyncLLMEngine, output: RequestOutput) -> str:
    if output.prompt is not None:
        return output.prompt
    return await engine.detokenize(output.prompt_token_ids)


async def echo_logprobs(
    engine: AsyncLLMEngine, output: RequestOutput, top_n: int | None
) -> CompletionLogprobs | None:
    """The prompt tokens' logprobs (None unless asked for and computed)."""
    if top_n is None or output.prompt_logprobs is None:
        return None
    ids, entries = output.prompt_token_ids, output.prompt_logprobs
    pairs = zip(ids, entries, strict=False)
    unscored = {t: await engine.detokenize([t]) for t, e in pairs if e is None}
    return completion_logprobs(ids, entries, top_n, 0, unscored)


def concat_logprobs(
    first: CompletionLogprobs | None, second: CompletionLogprobs | None
) -> CompletionLogprobs | None:
    if first is None or second is None:
        return first or second
    return CompletionLogprobs(
        text_offset=first.text_offset + second.text_offset,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )
