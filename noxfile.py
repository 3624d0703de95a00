"""Sessions: tests (the whole suite), conformance (per device), lint.

Each virtualenv gets the CPU build of torch first (pinned, so no CUDA wheels are pulled), then
hwlm with the `dev` extra (the `test` extra only, for the conformance session). On a machine
without network, run `nox --no-venv -s conformance -- --device cuda`.
"""

from __future__ import annotations

import nox

TORCH_CPU = "torch==2.13.0"
# The triton the Triton kernels are checked with under TRITON_INTERPRET=1 (no GPU needed); the
# `test` extra accepts a range.
TRITON = "triton==3.6.0"
nox.options.sessions = ["lint", "tests"]


def install(session: nox.Session, extra: str = "dev") -> None:
    if session.venv_backend != "none":
        session.install(TORCH_CPU, TRITON)
        session.install("-e", f".[{extra}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite on the cpu backend, then the conformance suite for the Triton kernels
    under Triton's CPU interpreter (small shapes)."""
    install(session)
    session.run("pytest", "-q", *session.posargs)
    session.run(
        "pytest",
        "-q",
        "tests/conformance",
        "--device",
        "triton-interpret",
        "--quick",
        env={"TRITON_INTERPRET": "1"},
    )


@nox.session
def conformance(session: nox.Session) -> None:
    install(session, "test")
    session.run("pytest", "-q", "tests/conformance", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    install(session)
    session.run("ruff", "check", "hwlm", "backends", "kernels", "tests", "ci", "noxfile.py")
    session.run(
        "ruff", "format", "--check", "hwlm", "backends", "kernels", "tests", "ci", "noxfile.py"
    )
    session.run("mypy", "--strict", "hwlm", "backends", "kernels")
