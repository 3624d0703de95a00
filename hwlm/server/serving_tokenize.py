"""POST /tokenize and /detokenize, with vLLM's request and response shapes."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from hwlm.server.chat_utils import apply_chat_template
from hwlm.server.common import check_model
from hwlm.server.engine_seam import Seam
from hwlm.server.errors import APIError
from hwlm.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)


async def tokenize(
    seam: Seam,
    served_model_name: str,
    request: TokenizeRequest,
    chat_template: str | None = None,
) -> JSONResponse:
    """Token ids of ``prompt``, or of ``messages`` after the chat template (whose text already
    holds the special tokens, so none are added by default)."""
    check_model(request.model, served_model_name)
    if (request.prompt is None) == (request.messages is None):
        raise APIError("give exactly one of prompt and messages", param="prompt")
    if request.messages is not None:
        text = apply_chat_template(
            seam.tokenizer, request.messages, request.add_generation_prompt, chat_template
        )
        special = bool(request.add_special_tokens)
    else:
        assert request.prompt is not None
        text = request.prompt
        special = request.add_special_tokens is not False
    tokens = await seam.tokenize(text, add_special_tokens=special)
    strs = await seam.token_strings(tokens) if request.return_token_strs else None
    body = TokenizeResponse(
        count=len(tokens), max_model_len=seam.max_model_len, tokens=tokens, token_strs=strs
    )
    return JSONResponse(body.model_dump())


async def detokenize(
    seam: Seam, served_model_name: str, request: DetokenizeRequest
) -> JSONResponse:
    check_model(request.model, served_model_name)
    vocab = len(seam.tokenizer)
    bad = [t for t in request.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens"
        )
    text = await seam.detokenize(request.tokens)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
