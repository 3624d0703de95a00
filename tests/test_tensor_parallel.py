"""Tensor parallelism on the CPU (gloo): a model split over two processes gives the tokens it
gives whole, and a model that cannot split is one clear error.

Each test starts its engines (a spawned worker costs a few seconds); ``tensor_parallel_size=1``
must start nothing at all.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hwlm import LLM, RequestOutput, SamplingParams
from tests.tiny_models import build_tiny_model

PROMPTS: list[list[int]] = [[5, 6, 7, 8, 9], [100, 200, 300], list(range(10, 60))]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
LOGPROBS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=2)
SEEDED = SamplingParams(temperature=0.8, seed=7, max_tokens=6, ignore_eos=True)
ENGINE = dict(device="cpu", num_kv_blocks=64, max_model_len=256, block_size=16)


@contextlib.contextmanager
def engine(folder: Path, **kwargs: Any) -> Iterator[LLM]:
    """An LLM whose workers are stopped on the way out, whatever happens."""
    llm = LLM(str(folder), **{**ENGINE, **kwargs})
    try:
        yield llm
    finally:
        if llm.engine.executor is not None:
            llm.engine.executor.shutdown()


def generate(llm: LLM, params: SamplingParams = GREEDY) -> list[RequestOutput]:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return llm.generate(prompts, params, use_tqdm=False)


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    folders = {}
    for arch in ("llama", "qwen3", "mistral", "opt"):
        build_tiny_model(arch, root / arch)
        folders[arch] = root / arch
    return folders


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "opt"])
def test_two_ranks_give_the_outputs_of_one(models: dict[str, Path], arch: str) -> None:
    """llama: 4 query / 2 KV heads (split); mistral: 1 KV head (replicated on both ranks);
    qwen3: q/k norms; opt: biases (row-parallel ones added once), tied vocab-parallel head.
    Greedy tokens, prompt logprobs (several gathers in one step) and a seeded draw."""
    results = []
    for size in (1, 2):
        with engine(models[arch], tensor_parallel_size=size) as llm:
            if size == 1:
                assert llm.engine.executor is None
                assert not multiprocessing.active_children()  # size 1 starts nothing
            else:
                kv_heads = llm.engine.model_config.num_kv_heads
                assert llm.engine.kv_heads == max(1, kv_heads // 2)
            results.append((generate(llm, LOGPROBS), generate(llm, SEEDED)))
    (want, want_drawn), (got, got_drawn) = results
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.outputs[0].token_ids for o in got_drawn] == [
        o.outputs[0].token_ids for o in want_drawn
    ]
    for whole, split in zip(want, got, strict=True):
        assert whole.prompt_logprobs is not None and split.prompt_logprobs is not None
        for a, b in zip(whole.prompt_logprobs[1:], split.prompt_logprobs[1:], strict=True):
            assert a is not None and b is not None and a.keys() == b.keys()
            for token, lp in a.items():
                assert b[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


def test_every_rank_replays_the_decode_runner_of_rank_0(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-rank decode runners (CUDA graphs on GPUs): each rank captures the same batch sizes
    in the same order and replays the same size for every decode step, padded alike (the
    replays run collectives, so a rank that ran eagerly or padded differently would hang or
    fail). ``cpu-replay`` is the cpu backend with a runner that logs, per process, what it
    captured and replayed."""
    from tests.plugins.example_backend import install_entry_points

    install_entry_points(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    logs = tmp_path / "replays"
    logs.mkdir()
    monkeypatch.setenv("HWLM_TEST_REPLAY_LOG", str(logs))
    with engine(models["llama"]) as whole:
        want = tokens(generate(whole))
    settings = dict(device="cpu-replay", tensor_parallel_size=2, max_num_seqs=5)
    with engine(models["llama"], **settings) as split:
        got = tokens(generate(split))
    assert got == want
    records = [path.read_text().splitlines() for path in sorted(logs.glob("*.log"))]
    assert len(records) == 2  # rank 0 and its worker, each its own process
    assert records[0] == records[1]
    captures = [line for line in records[0] if line.startswith("capture")]
    replays = [line for line in records[0] if line.startswith("replay")]
    assert captures == ["capture 5", "capture 4", "capture 2", "capture 1"]
    # Three prompts, nine decode steps each, run as batches of three padded to four.
    assert replays == ["replay 4"] * (GREEDY.max_tokens - 1)


def test_indivisible_heads_are_one_clear_error(models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 .*num_attention_heads 4"):
        LLM(str(models["llama"]), **ENGINE, tensor_parallel_size=3)
    assert not multiprocessing.active_children()  # refused before any worker started


def test_int8_weights_split(models: dict[str, Path]) -> None:
    """Quantized at load, each rank its own shard: runs, and greedy agrees with int8 whole on
    the first token of each prompt (row-parallel shards get their own per-channel scales, so
    later tokens may drift)."""
    pytest.importorskip("onnxruntime")
    with engine(models["llama"], quantization="int8") as whole:
        want = tokens(generate(whole))
    with engine(models["llama"], quantization="int8", tensor_parallel_size=2) as split:
        got = tokens(generate(split))
    assert [len(t) for t in got] == [GREEDY.max_tokens] * len(PROMPTS)
    assert [t[0] for t in got] == [t[0] for t in want]


def test_killed_worker_fails_the_step_and_leaves_no_process(models: dict[str, Path]) -> None:
    with engine(models["llama"], tensor_parallel_size=2) as llm:
        (worker,) = multiprocessing.active_children()
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        killer = threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(RuntimeError, match="tensor-parallel"):
            for _ in range(20):  # one of these runs while the worker dies
                llm.generate([{"prompt_token_ids": p} for p in PROMPTS], long, use_tqdm=False)
        killer.join()
        with pytest.raises(RuntimeError, match="tensor-parallel"):
            generate(llm)  # the engine stays failed (the watchdog's or the collective's error)
    assert not multiprocessing.active_children()


def test_ray_executor_gives_the_same_tokens(models: dict[str, Path]) -> None:
    pytest.importorskip(
        "ray", reason="the Ray executor needs ray (pip install 'hwlm[distributed]')"
    )
    with engine(models["llama"]) as whole:
        want = tokens(generate(whole))
    with engine(
        models["llama"], tensor_parallel_size=2, distributed_executor_backend="ray"
    ) as split:
        got = tokens(generate(split))
    assert got == want


def test_dropping_the_llm_stops_its_workers(models: dict[str, Path]) -> None:
    llm = LLM(str(models["llama"]), **ENGINE, tensor_parallel_size=2)
    assert len(multiprocessing.active_children()) == 1
    del llm
    gc.collect()  # the executor's finalizer stops its workers, without a shutdown call
    assert not multiprocessing.active_children()
