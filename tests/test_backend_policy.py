"""Device policy is the backend's: a backend that answers ``overlap_steps``,
``profile_memory_with_warm_up``, ``default_max_num_batched_tokens``, ``upload`` and
``start_host_copy`` unlike the CPU changes what the engine does, with no change to hwlm. The
backend here is a plugin found through its entry point (``tests/plugins/example_backend.py``).

Also the warm-up every engine runs before serving: it compiles what the first request would
otherwise wait for, and leaves no trace in the random state."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from hwlm import LLM, SamplingParams
from hwlm.backend import Backend
from hwlm.engine.llm_engine import LLMEngine
from hwlm.engine.scheduler import ScheduledBatch
from hwlm.engine.sequence import Sequence
from hwlm.engine.transfer import CopyAtWait
from hwlm.engine_args import EngineArgs
from hwlm.sampling.sampler import SampledBatch, SamplerOutput
from tests.plugins.example_backend import AcceleratorLike, ExampleBackend, install_entry_points
from tests.tiny_models import build_tiny_model

SETTINGS: dict[str, Any] = dict(max_model_len=128, max_num_seqs=8, block_size=8)


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    install_entry_points(str(site))
    monkeypatch.syspath_prepend(str(site))
    return site


def _backend(llm: LLM) -> AcceleratorLike:
    backend = llm.engine.backend
    assert isinstance(backend, AcceleratorLike)
    return backend


def test_defaults_are_the_cpus() -> None:
    engine = LLM("hwlm-tiny", device="cpu", **SETTINGS).engine
    backend = engine.backend
    assert not backend.overlap_steps and engine.async_scheduling is False
    expected = max(Backend.default_max_num_batched_tokens(backend, True), SETTINGS["max_num_seqs"])
    assert engine.config.max_num_batched_tokens == expected
    host = torch.arange(4)
    assert backend.upload(host) is host  # no copy on the CPU
    assert isinstance(backend.start_host_copy([host]), CopyAtWait)


def test_overlap_and_token_budget_follow_the_backend(plugin_site: Path) -> None:
    llm = LLM("hwlm-tiny", device="example-accelerator", **SETTINGS)
    assert llm.engine.async_scheduling is True
    assert llm.engine.config.max_num_batched_tokens == AcceleratorLike.TOKEN_BUDGETS[True]
    server = LLMEngine(EngineArgs(model="hwlm-tiny", device="example-accelerator", **SETTINGS))
    assert server.config.max_num_batched_tokens == AcceleratorLike.TOKEN_BUDGETS[False]
    explicit = LLM("hwlm-tiny", device="example-accelerator", async_scheduling=False, **SETTINGS)
    assert explicit.engine.async_scheduling is False  # the user's choice wins


def test_steps_overlap_and_give_the_same_tokens(
    plugin_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM("hwlm-tiny", device="example-accelerator", **SETTINGS)
    events: list[str] = []
    launch, to_output = llm.engine.runner.launch, SampledBatch.to_output

    def logged_launch(batch: ScheduledBatch) -> SampledBatch | None:
        events.append("launch")
        return launch(batch)

    def logged_read(self: SampledBatch) -> SamplerOutput:
        events.append("read")
        return to_output(self)

    monkeypatch.setattr(llm.engine.runner, "launch", logged_launch)
    monkeypatch.setattr(SampledBatch, "to_output", logged_read)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.generate(["x y"], params, use_tqdm=False)
    assert events[:3] == ["launch", "launch", "read"]  # step 2 launched before step 1 is read
    reference = LLM("hwlm-tiny", device="example", **SETTINGS).generate(["x y"], params)
    assert out[0].outputs[0].token_ids == reference[0].outputs[0].token_ids


def test_copies_go_through_the_backend(plugin_site: Path) -> None:
    llm = LLM("hwlm-tiny", device="example-accelerator", **SETTINGS)
    backend = _backend(llm)
    uploads, copies = backend.uploads, backend.host_copies
    sampled: list[SampledBatch] = []
    launch = llm.engine.runner.launch
    llm.engine.runner.launch = lambda batch: _keep(launch(batch), sampled)  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.8, top_k=5, max_tokens=5, seed=1, ignore_eos=True)
    llm.generate(["a b c", "d e"], params, use_tqdm=False)
    assert backend.host_copies - copies == len(sampled) > 0
    # Two uploads of step inputs per step, and more for the sampler's per-row settings.
    assert backend.uploads - uploads > 2 * len(sampled)


def _keep(result: SampledBatch | None, into: list[SampledBatch]) -> SampledBatch | None:
    if result is not None:
        into.append(result)
    return result


def test_sampler_uploads_through_the_backend(plugin_site: Path) -> None:
    llm = LLM("hwlm-tiny", device="example-accelerator", **SETTINGS)
    backend, sampler = _backend(llm), llm.engine.runner.sampler
    seqs = [Sequence(i, str(i), [1], SamplingParams(temperature=0.7, top_p=0.9)) for i in range(3)]
    before = backend.uploads
    sampler.sample(torch.randn(3, 1024), seqs).to_output()
    assert backend.uploads > before


def test_memory_profiling_warm_up_is_a_full_step_before_the_budget(plugin_site: Path) -> None:
    llm = LLM("hwlm-tiny", device="example-accelerator", **SETTINGS)
    seen = _backend(llm).tokens_before_budget
    assert seen is not None and max(seen) == llm.engine.config.max_num_batched_tokens


def test_other_backends_warm_up_with_small_steps(
    plugin_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(AcceleratorLike, "profile_memory_with_warm_up", False)
    llm = LLM("hwlm-tiny", device="example-accelerator", **SETTINGS)
    seen = _backend(llm).tokens_before_budget
    budget = llm.engine.config.max_num_batched_tokens
    assert seen and max(seen) < budget  # warmed up, but not with a full step
    assert 1 in seen  # a one-token decode step


def test_warm_up_logs_and_keeps_the_random_state(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hwlm.engine.llm_engine"):
        engine = LLM("hwlm-tiny", device="cpu", **SETTINGS).engine
    assert any(r.getMessage().startswith("warmed up in ") for r in caplog.records)
    state = torch.get_rng_state()
    for full in (False, True):
        engine.runner.warm_up(engine._allocate_kv_cache(1), full=full)
        assert torch.equal(torch.get_rng_state(), state)


_NUMBA_KERNELS = [
    ("hwlm.kernels.numba.paged_attention", "_attention"),
    ("hwlm.kernels.numba.paged_attention", "_attention_serial"),
    ("hwlm.kernels.numba.paged_attention", "_write_kv"),
    ("hwlm.kernels.numba.paged_attention", "_write_kv_serial"),
] + [
    ("hwlm.kernels.numba.fused", f"_{op}{variant}")
    for op in ("rms_norm", "add_rms_norm", "silu_and_mul", "rotary")
    for variant in ("", "_serial")
]


def _compiled_variants() -> list[int]:
    """How many signatures each numba kernel has compiled in this process."""
    return [len(getattr(importlib.import_module(m), f).signatures) for m, f in _NUMBA_KERNELS]


@pytest.mark.parametrize("arch", ["hwlm-tiny", "opt"])  # opt: attention reads strided k/v
def test_cpu_requests_compile_nothing_after_start(arch: str, tmp_path: Path) -> None:
    model = arch
    if arch == "opt":
        build_tiny_model("opt", tmp_path)
        model = str(tmp_path)
    llm = LLM(model, device="cpu", **SETTINGS)
    compiled = _compiled_variants()
    assert compiled[1] and compiled[3]  # one-token attention and write_kv (every model runs them)
    prompts = ["a b c d e f g h i j k l m n o p q r", "x"]  # several prefill shapes, then decode
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    llm.generate(prompts[1], SamplingParams(temperature=0.5, max_tokens=3), use_tqdm=False)
    assert _compiled_variants() == compiled


def test_triton_interpreter_keeps_the_cpu_policy() -> None:
    pytest.importorskip("triton")
    from hwlm.backends.cuda import CUDABackend
    from hwlm.backends.triton_interpret import TritonInterpreterBackend

    assert CUDABackend.overlap_steps and CUDABackend.profile_memory_with_warm_up
    gpu = CUDABackend()  # constructing it starts no CUDA runtime
    assert gpu.default_max_num_batched_tokens(True) > gpu.default_max_num_batched_tokens(False)
    interpreter = TritonInterpreterBackend()
    assert not interpreter.overlap_steps and not interpreter.profile_memory_with_warm_up
    plain = ExampleBackend()
    for offline in (True, False):
        got = interpreter.default_max_num_batched_tokens(offline)
        assert got == plain.default_max_num_batched_tokens(offline)
    host = torch.arange(3)
    assert interpreter.upload(host) is host
    assert isinstance(interpreter.start_host_copy([host]), CopyAtWait)


def test_piecewise_graph_cap_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """HWLM_PIECEWISE_MAX_TOKENS: unset records every step size, 0 none, a number caps them; a
    malformed value is a one-line error naming the variable."""
    from hwlm.backends.cuda import PIECEWISE_MAX_TOKENS_ENV, piecewise_max_tokens

    monkeypatch.delenv(PIECEWISE_MAX_TOKENS_ENV, raising=False)
    assert piecewise_max_tokens() is None
    for text, value in (("0", 0), ("2048", 2048), (" 512 ", 512)):
        monkeypatch.setenv(PIECEWISE_MAX_TOKENS_ENV, text)
        assert piecewise_max_tokens() == value
    for bad in ("-1", "2k"):
        monkeypatch.setenv(PIECEWISE_MAX_TOKENS_ENV, bad)
        with pytest.raises(ValueError, match=f"{PIECEWISE_MAX_TOKENS_ENV} must be a token count"):
            piecewise_max_tokens()
