"""The FastAPI application: OpenAI-compatible routes over an AsyncLLMEngine.

GET /health, GET /version, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
Every error is an OpenAI error body (see ``hwlm.server.errors``); with an API key configured the
/v1 routes need ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import hwlm
from hwlm.server.async_engine import AsyncLLMEngine
from hwlm.server.auth import APIKeyMiddleware
from hwlm.server.errors import APIError, install_error_handlers
from hwlm.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from hwlm.server.serving_chat import create_chat_completion
from hwlm.server.serving_completion import create_completion

logger = logging.getLogger(__name__)


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None) -> FastAPI:
    """The app; it does not own ``engine`` (whoever built the engine shuts it down)."""
    app = FastAPI(title="hwlm OpenAI-compatible server", version=hwlm.__version__)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.state.engine = engine
    app.state.served_model_name = served_model_name

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy():
            raise APIError("the engine is dead", 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": hwlm.__version__})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = ModelCard(id=served_model_name, max_model_len=engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return await create_completion(engine, served_model_name, request, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(engine, served_model_name, request, raw)

    return app
