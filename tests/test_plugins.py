"""Backends from other packages (entry-point group ``hwlm.backends``), interface versions, and
``--device auto`` ranking."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hwlm import registry
from hwlm.backend import Backend, ProbeResult
from tests.plugins.example_backend import ExampleBackend, install_entry_points

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    install_entry_points(str(site))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_plugin_is_discovered_and_selectable(plugin_site: Path) -> None:
    assert registry.known_backends()["example"] == "tests.plugins.example_backend:ExampleBackend"
    assert registry.select_backend("example") is ExampleBackend


def test_plugin_for_another_interface_version_is_refused(plugin_site: Path) -> None:
    with pytest.raises(ValueError, match="interface version 0, but this hwlm has version 1"):
        registry.select_backend("example-old")
    listed = {info.name: info for info in registry.describe_backends()}
    assert not listed["example-old"].probe.available
    assert "interface version 0" in listed["example-old"].probe.reason
    assert listed["example"].probe.available


def test_engine_runs_on_a_plugin(plugin_site: Path) -> None:
    from hwlm import LLM, SamplingParams

    llm = LLM("hwlm-tiny", device="example", max_model_len=128)
    out = llm.generate("hello", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def run_conformance(site: Path, device: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    cmd = [sys.executable, "-m", "pytest", "tests/conformance", "--device", device, "--quick", "-q"]
    cmd += ["-p", "no:cacheprovider"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_conformance_passes_for_a_correct_plugin(plugin_site: Path) -> None:
    result = run_conformance(plugin_site, "example")
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.parametrize(
    ("device", "failing_case"),
    [
        ("example-no-block-table", "test_attention[prefill-float32-bs16-gqa1-d64]"),
        ("example-bad-write", "test_write_kv[float32-bs16-d64]"),
    ],
)
def test_conformance_catches_a_wrong_plugin(
    plugin_site: Path, device: str, failing_case: str
) -> None:
    result = run_conformance(plugin_site, device)
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"FAILED tests/conformance/test_ops.py::{failing_case}" in result.stdout


def test_unavailable_explicit_device_fails_with_its_reason(plugin_site: Path) -> None:
    result = run_conformance(plugin_site, "example-old")
    assert result.returncode != 0
    assert "interface version 0" in result.stdout + result.stderr


# --device auto, with faked probes --------------------------------------------------------------


def fake_backend(name: str, available: bool, score: int) -> type[Backend]:
    def probe(cls: type[Backend]) -> ProbeResult:
        return ProbeResult(available, score, f"fake {name}")

    return type(name, (ExampleBackend,), {"name": name, "probe": classmethod(probe)})


@pytest.mark.parametrize(
    ("cuda", "rocm", "expected"),
    [(True, False, "cuda"), (False, True, "rocm"), (False, False, "cpu"), (True, True, "cuda")],
)
def test_auto_ranks_gpus_before_cpu(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, rocm: bool, expected: str
) -> None:
    fakes = {
        "cpu": fake_backend("cpu", True, 10),
        "cuda": fake_backend("cuda", cuda, 100),
        "rocm": fake_backend("rocm", rocm, 99),
    }
    monkeypatch.setattr(registry, "known_backends", lambda: {n: n for n in fakes})
    monkeypatch.setattr(registry, "load_backend_class", lambda name, target: fakes[name])
    assert registry.select_backend("auto") is fakes[expected]
    if not cuda:
        with pytest.raises(ValueError, match="device 'cuda' is not available: fake cuda"):
            registry.select_backend("cuda")


def test_auto_with_nothing_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "known_backends", lambda: {"cpu": "cpu"})
    monkeypatch.setattr(registry, "load_backend_class", lambda n, t: fake_backend("cpu", False, 10))
    with pytest.raises(ValueError, match="no usable device"):
        registry.select_backend("auto")
