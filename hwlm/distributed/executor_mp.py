"""The multiprocessing executor: ranks 1..N-1 as spawned processes on this host (spawn, not
fork: numba's OpenMP and CUDA must not be forked)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
from collections.abc import Iterator
from multiprocessing.process import BaseProcess

from hwlm.distributed.worker import WorkerSpec, run_worker

logger = logging.getLogger(__name__)


class ProcessWorkers:
    """The worker processes; each one's sentinel tells the watchdog when it ends."""

    def __init__(self, processes: list[BaseProcess]) -> None:
        self.processes = processes

    def wait_for_exit(self, timeout: float) -> str | None:
        sentinels = [p.sentinel for p in self.processes]
        ended = multiprocessing.connection.wait(sentinels, timeout)
        for process in self.processes:
            if process.sentinel in ended:
                process.join(0)
                return _describe_exit(process)
        return None

    def stop(self, timeout: float) -> None:
        for process in self.processes:
            process.join(timeout)
            timeout = 0.0  # the others had the same time to exit
            if process.is_alive():
                logger.warning(
                    "tensor-parallel worker pid %s did not exit; killing it", process.pid
                )
                process.kill()
                process.join(5.0)


def launch_processes(specs: list[WorkerSpec]) -> ProcessWorkers:
    spawn = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = []
    for spec in specs:
        process = spawn.Process(
            target=_process_main,
            args=(spec,),
            name=f"hwlm-tp-worker-{spec.rank}",
            daemon=True,  # terminated when the engine process exits normally
        )
        with _children_allowed():
            process.start()
        processes.append(process)
    return ProcessWorkers(processes)


def _process_main(spec: WorkerSpec) -> None:
    raise SystemExit(run_worker(spec))


def _describe_exit(process: BaseProcess) -> str:
    code = process.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
    return f"worker {process.name} (pid {process.pid}) {how}"


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a daemonic process (the engine-core process is one) start the workers.

    multiprocessing refuses because a daemon's children would outlive it when it is killed; a
    worker watches the engine itself (``hwlm.distributed.worker``) and exits when it goes."""
    config = getattr(multiprocessing.current_process(), "_config", None)
    if not isinstance(config, dict) or not config.get("daemon"):
        yield
        return
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = True
