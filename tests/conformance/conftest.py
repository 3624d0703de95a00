"""The conformance suite's backend (from ``--device``) and its support-matrix writer."""

from __future__ import annotations

from collections import defaultdict

import pytest

from hwlm.backend import Backend
from hwlm.registry import select_backend
from tests.conformance.support_matrix import record, tag, write_matrix

_results: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)


@pytest.fixture(scope="session")
def backend(device: str) -> Backend:
    """An instance of the backend under test; an unavailable device fails with its reason."""
    try:
        return select_backend(device)()
    except ValueError as exc:
        pytest.exit(f"conformance: {exc}", returncode=4)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    tag(item, outcome.get_result())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Runs where results are collected: in-process, or on pytest-xdist's controller."""
    record(_results, report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes
        return
    path = session.config.getoption("--support-matrix")
    if path and _results:
        write_matrix(path, session.config.getoption("--device"), _results)
