"""The FastAPI application: OpenAI-compatible routes over an AsyncLLMEngine.

GET|HEAD /health, GET|HEAD|POST /ping, GET /version, GET /metrics (Prometheus), POST /tokenize,
POST /detokenize, GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions; the OpenAI and vLLM endpoints hwlm does not serve answer 404 naming
them (``hwlm.server.unserved``).
Every error is an OpenAI error body (see ``hwlm.server.errors``); with an API key configured every
route but /health, /ping, /version and (unless ``metrics_require_key``) /metrics needs
``Authorization: Bearer <key>``. POST bodies must be JSON (415 otherwise).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import hwlm
from hwlm.server.admission import ServerLimits, check_capacity, check_request, num_sequences
from hwlm.server.async_engine import AsyncLLMEngine
from hwlm.server.auth import OPEN_PATHS, APIKeyMiddleware
from hwlm.server.body_limit import BodySizeLimitMiddleware
from hwlm.server.body_timeout import BodyTimeoutMiddleware
from hwlm.server.chat import ChatSettings, ChatShape
from hwlm.server.completions import CompletionShape
from hwlm.server.content_type import JSONContentTypeMiddleware
from hwlm.server.cors import CORSSettings, install_cors
from hwlm.server.crash_guard import InternalErrorMiddleware
from hwlm.server.engine_seam import EngineSeam, Seam
from hwlm.server.engine_seam_mp import ProcessEngineSeam
from hwlm.server.errors import APIError, install_error_handlers
from hwlm.server.logprob_budget import check_logprob_entries
from hwlm.server.pipeline import serve_generation
from hwlm.server.prometheus import CONTENT_TYPE, metrics_registry, render_metrics
from hwlm.server.prompt_bound import check_text_length, longest_piece_bytes, prompt_texts
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
from hwlm.server.text_check import check_text_fields
from hwlm.server.unserved import install_unserved_routes

logger = logging.getLogger(__name__)


def build_app(
    engine: AsyncLLMEngine | ProcessEngineSeam,
    served_model_name: str,
    api_key: str | None,
    limits: ServerLimits | None = None,
    cors: CORSSettings | None = None,
    chat_template: str | None = None,
    chat: ChatSettings | None = None,
) -> FastAPI:
    """The app; it does not own ``engine`` (whoever built the engine shuts it down), an
    ``AsyncLLMEngine`` or a ``ProcessEngineSeam`` (``--engine-process``). Setting
    ``app.state.draining`` makes new /v1 generation requests fail with 503 (shutdown).
    ``chat_template`` (Jinja text) replaces the tokenizer's own; ``chat``: the tool and
    reasoning options of /v1/chat/completions."""
    app = FastAPI(title="hwlm OpenAI-compatible server", version=hwlm.__version__)
    install_error_handlers(app)
    limits = limits or ServerLimits()
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_request_bytes)
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=limits.body_timeout_s)
    app.add_middleware(JSONContentTypeMiddleware)
    if api_key:
        open_paths = OPEN_PATHS if limits.metrics_require_key else OPEN_PATHS | {"/metrics"}
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=open_paths)
    app.add_middleware(InternalErrorMiddleware)  # a bug's 500 is a proper response
    install_cors(app, cors)  # outermost: preflights and error responses get CORS headers too
    app.state.engine = engine
    # The routes reach the engine only through this.
    seam: Seam = engine if isinstance(engine, ProcessEngineSeam) else EngineSeam(engine)
    app.state.served_model_name = served_model_name
    app.state.limits = limits
    app.state.draining = False

    def admit(request: SamplingRequest) -> None:
        check_text_fields(request)
        check_request(request, limits)
        longest = longest_piece_bytes(seam.tokenizer)
        for texts in prompt_texts(request):
            param = "messages" if hasattr(request, "messages") else "prompt"
            check_text_length(texts, seam.max_model_len, longest, param)
        check_logprob_entries(request, seam.max_model_len, limits.max_logprob_entries)
        waiting = seam.num_waiting_sequences()
        check_capacity(waiting, limits, app.state.draining, num_sequences(request))

    @app.get("/health")
    async def health() -> Response:
        if not seam.is_healthy():
            raise APIError("the engine is dead", 503)
        return Response(status_code=200)

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    for path, probe in (("/health", health), ("/ping", ping)):  # HEAD and POST: out of the schema
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/ping", ping, methods=["POST"], include_in_schema=False)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": hwlm.__version__})

    registry = metrics_registry(
        served_model_name,
        seam.stats_snapshot,
        seam.metrics_snapshot,
        getattr(seam, "core_stats", None),  # ProcessEngineSeam's: per-core metrics
    )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(registry), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = ModelCard(id=served_model_name, max_model_len=seam.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != served_model_name:
            raise APIError(
                f"the model {model_id!r} does not exist; this server serves {served_model_name!r}",
                404,
                param="model",
                code="model_not_found",
            )
        card = ModelCard(id=served_model_name, max_model_len=seam.max_model_len)
        return JSONResponse(card.model_dump())

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        shape = CompletionShape(request, served_model_name)
        return await serve_generation(seam, shape, admit, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        shape = ChatShape(request, served_model_name, chat_template, chat)
        return await serve_generation(seam, shape, admit, raw)

    @app.post("/tokenize")
    async def tokenize_route(request: TokenizeRequest) -> Response:
        check_text_fields(request)
        return await tokenize(seam, served_model_name, request, chat_template)

    @app.post("/detokenize")
    async def detokenize_route(request: DetokenizeRequest) -> Response:
        return await detokenize(seam, served_model_name, request)

    install_unserved_routes(app)  # last: it must not shadow a served route
    return app
