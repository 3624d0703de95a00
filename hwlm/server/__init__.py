"""The OpenAI-compatible HTTP server (``hwlm serve``).

Importing this package needs no web framework: fastapi, uvicorn and pydantic are imported only
by ``hwlm.server.api`` / ``hwlm.server.protocol`` and inside ``hwlm.cli.serve.run_serve``.
"""

from hwlm.server.async_engine import AsyncLLMEngine, EngineDeadError, EngineStats, RequestStream

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineStats", "RequestStream"]
