"""Shared pytest options: ``--device`` picks the backend the engine-level tests run on."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest


def _import_installed_kernels_package() -> None:
    """Import the installed ``kernels`` distribution (Hugging Face's hub kernels, which
    transformers >= 5.25 requires and imports) before anything else can: the tests put the
    repository's root on ``sys.path``, and hwlm's own ``kernels/`` folder there (installed as
    ``hwlm.kernels``) would otherwise be found under that name and break transformers."""
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != root]
    try:
        with contextlib.suppress(ImportError):  # not installed: nothing to shadow
            import kernels  # noqa: F401
    finally:
        sys.path[:] = saved


_import_installed_kernels_package()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="backend for end-to-end tests: cpu, cuda, rocm, a plugin name, or auto",
    )
    parser.addoption(
        "--quick",
        action="store_true",
        help="conformance: a small grid of cases (for slow backends, e.g. the Triton interpreter)",
    )
    parser.addoption(
        "--support-matrix",
        default=None,
        metavar="PATH",
        help="conformance: write (merge) this device's column of the support matrix into PATH",
    )
    parser.addoption(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="conformance end-to-end tests: run the --device engines split over this many ranks",
    )


@pytest.fixture(scope="session")
def tensor_parallel_size(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--tensor-parallel-size"))


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--device"))
