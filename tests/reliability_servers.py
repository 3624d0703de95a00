"""Servers for the reliability tests, both real uvicorn servers on 127.0.0.1:

* ``ServerProcess``: ``python -m hwlm.server`` in a subprocess (signals, logs, memory, binding).
* ``ThreadedServer``: uvicorn on a thread of the test process, over an engine the test can reach
  into (inject faults, read KV block counts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import uvicorn

from tests.server_helpers import ROOT, free_port, wait_ready


class ServerProcess:
    """A server subprocess; as a context manager it is stopped with SIGTERM and must exit 0."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        host: str | None = "127.0.0.1",
        headers: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.headers = headers
        argv = [sys.executable, "-m", "hwlm.server", *args, "--port", str(self.port)]
        if host is not None:
            argv += ["--host", host]
        self.argv = argv
        self.env = {**os.environ, "HWLM_API_KEY": "", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env
            )
        try:
            wait_ready(self.url, self.proc, self.log, self.headers)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        return self

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.terminate()
        code = self.wait()
        assert code == 0, self.log.read_text()


class ThreadedServer:
    """uvicorn serving ``app`` on a thread of this process."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        wait_ready(self.url, None, None)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
