"""Shared pytest options: ``--device`` picks the backend the engine-level tests run on."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="backend for end-to-end tests: cpu, cuda, rocm, a plugin name, or auto",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--device"))
