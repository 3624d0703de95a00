"""An opt-in record of the engine core's turns, for finding where a serving run's time goes:
with ``HWLM_ENGINE_TRACE=PATH`` every turn appends one line to PATH (``ci/s1.sh`` reads it).

A line is ``start applied end adds aborts running waiting``: the turn's monotonic start, the
time its inputs were applied and its end (seconds), the requests it added and aborted, and the
sequences running and waiting after it.
"""

from __future__ import annotations

import os
import time
from typing import IO

TRACE_ENV = "HWLM_ENGINE_TRACE"


class TurnTrace:
    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    @classmethod
    def from_env(cls) -> TurnTrace | None:
        path = os.environ.get(TRACE_ENV)
        return cls(path) if path else None

    def record(
        self, start: float, applied: float, adds: int, aborts: int, running: int, waiting: int
    ) -> None:
        end = time.monotonic()
        line = f"{start:.6f} {applied:.6f} {end:.6f} {adds} {aborts} {running} {waiting}\n"
        self._file.write(line)
