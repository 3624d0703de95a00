"""Cross-origin resource sharing: off unless origins are configured (``--allowed-origins``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware


@dataclass(frozen=True)
class CORSSettings:
    """vLLM's flags: --allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials."""

    allowed_origins: list[str] = field(default_factory=list)  # empty: CORS off
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False


def install_cors(app: FastAPI, settings: CORSSettings | None) -> None:
    """Add CORS headers for the configured origins; with none configured, add nothing, so that
    browsers refuse cross-origin reads."""
    if settings is None or not settings.allowed_origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_methods=settings.allowed_methods,
        allow_headers=settings.allowed_headers,
        allow_credentials=settings.allow_credentials,
    )
