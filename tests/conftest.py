"""Shared pytest options: ``--device`` picks the backend the engine-level tests run on."""

from __future__ import annotations

import pytest


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


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--device"))
