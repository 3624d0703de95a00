"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through here, including FastAPI's own validation errors
(OpenAI answers 400 where FastAPI would say 422) and unknown routes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hwlm.sampling_params import ParameterError
from hwlm.server.engine_seam import EngineDeadError
from hwlm.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

QUOTE_CHARS = 200  # the most characters of a client's input an error message repeats
MAX_MESSAGE_CHARS = 400  # a longer message (one quoting input it did not cut) is cut


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)``, cut to about ``limit`` characters: how error messages quote input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    cut = len(message) - MAX_MESSAGE_CHARS
    return f"{message[:MAX_MESSAGE_CHARS]}... ({cut} more characters)"


class APIError(Exception):
    """Raised by handlers; answered with ``status`` and an OpenAI error body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = _bounded(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}  # e.g. Retry-After on 503

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(
    exc: ValueError, fields: Collection[str] | None = None, default: str | None = None
) -> APIError:
    """A 400 for ``exc``, raised while checking a request or adding it to the engine. Its
    ``param`` is the field a ``ParameterError`` names (if the request has it: ``fields``, None
    for any), else ``default`` (the prompt, say, for the engine's other ValueErrors)."""
    if not isinstance(exc, ParameterError):
        return APIError(str(exc), 400, param=default)
    known = fields is None or exc.param in fields
    return APIError(str(exc), 400, param=exc.param if known else None)


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready; nobody reads the
    answer, which is an empty 499 (nginx's "client closed request")."""


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable message for pydantic's errors, and the first offending field. Errors of one
    field that fails every member of a union (``prompt``) are reported once."""
    by_field: dict[str, list[dict[str, Any]]] = {}
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            return f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}", None
        loc = [str(p)[:QUOTE_CHARS] for p in error.get("loc", ()) if p != "body"]
        by_field.setdefault(loc[0] if loc else "", []).append({**error, "loc": loc})
    parts = []
    for field, errors in by_field.items():
        if len(errors) > 1 and field:
            parts.append(f"{field}: has an invalid type or value ({errors[0].get('msg')})")
        else:
            where = ".".join(errors[0]["loc"])
            msg = errors[0].get("msg")
            parts.append(f"{where}: {msg}" if where else f"the body is invalid: {msg}")
    return "; ".join(parts) or "invalid request", next((f for f in by_field if f), None)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_message(exc)
    return APIError(message, 400, param=param).response()


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) else phrase
    if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
        message = (
            f"the body is not valid UTF-8: {exc.__cause__.reason} at byte {exc.__cause__.start}"
        )
    response = APIError(message, exc.status_code).response()
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _on_engine_dead(request: Request, exc: Exception) -> JSONResponse:
    return APIError(str(exc), 503).response()


async def _on_client_disconnected(request: Request, exc: Exception) -> Response:
    logger.info("client disconnected from %s; its requests were aborted", request.url.path)
    return Response(status_code=499)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error serving %s %s", request.method, request.url.path)
    return APIError("internal server error", 500).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(EngineDeadError, _on_engine_dead)
    app.add_exception_handler(ClientDisconnected, _on_client_disconnected)
    app.add_exception_handler(Exception, _on_unexpected)
