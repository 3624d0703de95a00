"""The FastAPI application: OpenAI-compatible routes over an AsyncLLMEngine.

GET /health, GET /version, GET /metrics (Prometheus), POST /tokenize, POST /detokenize,
GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
Every error is an OpenAI error body (see ``hwlm.server.errors``); with an API key configured the
/v1 routes need ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import hwlm
from hwlm.server.admission import ServerLimits, check_capacity, check_request, num_prompts
from hwlm.server.async_engine import AsyncLLMEngine
from hwlm.server.auth import APIKeyMiddleware
from hwlm.server.body_limit import BodySizeLimitMiddleware
from hwlm.server.chat import ChatShape
from hwlm.server.completions import CompletionShape
from hwlm.server.cors import CORSSettings, install_cors
from hwlm.server.engine_seam import EngineSeam, Seam
from hwlm.server.engine_seam_mp import ProcessEngineSeam
from hwlm.server.errors import APIError, install_error_handlers
from hwlm.server.pipeline import serve_generation
from hwlm.server.prometheus import CONTENT_TYPE, metrics_registry, render_metrics
from hwlm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
)
from hwlm.server.serving_tokenize import detokenize, tokenize

logger = logging.getLogger(__name__)


def build_app(
    engine: AsyncLLMEngine | ProcessEngineSeam,
    served_model_name: str,
    api_key: str | None,
    limits: ServerLimits | None = None,
    cors: CORSSettings | None = None,
    chat_template: str | None = None,
) -> FastAPI:
    """The app; it does not own ``engine`` (whoever built the engine shuts it down), an
    ``AsyncLLMEngine`` or a ``ProcessEngineSeam`` (``--engine-process``). Setting
    ``app.state.draining`` makes new /v1 generation requests fail with 503 (shutdown).
    ``chat_template`` (Jinja text) replaces the tokenizer's own."""
    app = FastAPI(title="hwlm OpenAI-compatible server", version=hwlm.__version__)
    install_error_handlers(app)
    limits = limits or ServerLimits()
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_request_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    install_cors(app, cors)  # outermost: preflights and error responses get CORS headers too
    app.state.engine = engine
    # The routes reach the engine only through this.
    seam: Seam = engine if isinstance(engine, ProcessEngineSeam) else EngineSeam(engine)
    app.state.served_model_name = served_model_name
    app.state.limits = limits
    app.state.draining = False

    def admit(request: SamplingRequest) -> None:
        check_request(request, limits)
        waiting = seam.num_waiting_requests()
        check_capacity(waiting, limits, app.state.draining, num_prompts(request))

    @app.get("/health")
    async def health() -> Response:
        if not seam.is_healthy():
            raise APIError("the engine is dead", 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": hwlm.__version__})

    registry = metrics_registry(served_model_name, seam.stats_snapshot, seam.metrics_snapshot)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(registry), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = ModelCard(id=served_model_name, max_model_len=seam.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        shape = CompletionShape(request, served_model_name)
        return await serve_generation(seam, shape, admit, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        shape = ChatShape(request, served_model_name, chat_template)
        return await serve_generation(seam, shape, admit, raw)

    @app.post("/tokenize")
    async def tokenize_route(request: TokenizeRequest) -> Response:
        return await tokenize(seam, served_model_name, request, chat_template)

    @app.post("/detokenize")
    async def detokenize_route(request: DetokenizeRequest) -> Response:
        return await detokenize(seam, served_model_name, request)

    return app
