"""The `hwlm` command line: devices (with --check), generate, and error handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from hwlm.cli.main import main
from tests.plugins.example_backend import install_entry_points


def test_devices_check_passes_good_and_fails_bad_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_entry_points(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["devices", "--check"])
    out = capsys.readouterr().out
    rows = out.splitlines()
    cpu = rows.index(next(r for r in rows if r.startswith("cpu ")))
    assert rows[cpu + 1].strip().startswith("PASS")
    bad = rows.index(next(r for r in rows if r.startswith("example-no-block-table ")))
    assert rows[bad + 1].strip().startswith("FAIL")
    old = next(r for r in rows if r.startswith("example-old "))
    assert " no " in old and "interface version 0" in old
    assert code == 1  # a failing backend makes the command fail


def test_generate_prints_the_completion(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["generate", "hwlm-tiny", "--prompt", "Hello", "--max-tokens", "4", "--device", "cpu"]
    )
    assert code == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_user_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "/no/such/model", "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("hwlm: error:") and "does not exist" in err and "\n" not in err


def test_python_m_from_a_checkout_does_not_shadow_the_kernels_distribution(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`python -m hwlm.cli` in the repository root: the root leaves sys.path (its kernels/
    folder is hwlm.kernels, not the `kernels` package transformers imports); elsewhere the
    working directory stays."""
    import sys

    from hwlm.cli.__main__ import unshadow_checkout

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "path", ["", str(root), "/somewhere/else"])
    unshadow_checkout()
    assert sys.path == ["/somewhere/else"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", "/somewhere/else"])
    unshadow_checkout()
    assert sys.path == ["", "/somewhere/else"]
