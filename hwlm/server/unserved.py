"""Routes of the OpenAI and vLLM APIs that hwlm does not serve: each answers 404 with an OpenAI
error body naming it, rather than a bare "Not Found" (a client then knows it reached hwlm and
that the endpoint, not the server, is missing)."""

from __future__ import annotations

from fastapi import FastAPI, Request

from hwlm.server.errors import APIError

# Paths (and, for those ending in /, everything under them) that hwlm does not serve.
UNSERVED = (
    "/v1/responses",
    "/v1/embeddings",
    "/v1/audio/",
    "/v1/images/",
    "/v1/moderations",
    "/v1/files",
    "/v1/batches",
    "/v1/fine_tuning/",
    "/v1/fine-tunes",
    "/v1/assistants",
    "/v1/threads",
    "/v1/vector_stores",
    "/v1/uploads",
    "/v1/realtime",
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/v1/score",
    "/score",
    "/pooling",
    "/classify",
    "/v1/classify",
    "/invocations",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


async def _not_served(request: Request) -> None:
    path = request.url.path
    raise APIError(
        f"{request.method} {path} is not served by hwlm: it serves /v1/completions, "
        "/v1/chat/completions and /v1/models",
        404,
        code="not_found",
    )


def install_unserved_routes(app: FastAPI) -> None:
    """Add the 404 routes; call after the served routes (so none of them is shadowed)."""
    for path in UNSERVED:
        base = path.rstrip("/")
        app.add_api_route(base, _not_served, methods=_METHODS, include_in_schema=False)
        app.add_api_route(
            base + "/{rest:path}", _not_served, methods=_METHODS, include_in_schema=False
        )
