"""The optional Backend.capture_decode hook: the model runner sends decode steps (one query token
per sequence) to the backend's DecodeRunner, everything else to the eager model, and
enforce_eager turns the hook off. The CUDA-graph runner itself runs on a GPU (the conformance
suite's e2e tests with --device cuda); here a recording runner stands in for it on the CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hwlm import LLM, SamplingParams
from hwlm.attention import AttentionMetadata, ForwardContext
from hwlm.backends.cpu import CPUBackend
from tests.tiny_models import build_tiny_model, hf_greedy


class RecordingRunner:
    """Runs the eager model, counting the steps it was given; refuses batches over max_seqs."""

    def __init__(self, model: Any, backend: Any, kv_caches: Any, max_seqs: int) -> None:
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.max_seqs = max_seqs
        self.steps: list[int] = []

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_seqs

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        assert metadata.max_query_len == 1 and input_ids.shape[0] == metadata.num_seqs
        self.steps.append(metadata.num_seqs)
        ctx = ForwardContext(self.backend, self.kv_caches, metadata)
        return self.model(input_ids, positions, ctx)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> list[RecordingRunner]:
    made: list[RecordingRunner] = []

    def capture_decode(self, model, kv_caches, max_num_seqs, max_model_len):  # noqa: ANN001
        made.append(RecordingRunner(model, self, kv_caches, max_seqs=3))
        return made[-1]

    monkeypatch.setattr(CPUBackend, "capture_decode", capture_decode)
    return made


def test_decode_steps_go_to_the_backend_runner(tmp_path, recording) -> None:
    hf_model = build_tiny_model("llama", tmp_path)
    prompts = [[5, 6, 7, 8, 9][: 2 + i] for i in range(4)]
    llm = LLM(str(tmp_path), device="cpu", max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    (runner,) = recording
    # One step prefills all four; their decode steps hold four sequences, more than the
    # runner takes, so they run eagerly. A prefill never reaches the runner.
    assert runner.steps == []
    small = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
    assert runner.steps == [2] * 5  # 6 tokens: 1 from the prefill step, then 5 decode steps
    want = [hf_greedy(hf_model, p, 6)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert [o.outputs[0].token_ids for o in small] == want[:2]


def test_enforce_eager_skips_the_hook(tmp_path, recording) -> None:
    build_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), device="cpu", enforce_eager=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert recording == []


def test_warm_up_step_writes_no_kv_and_leaves_the_engine_usable(tmp_path) -> None:
    hf_model = build_tiny_model("llama", tmp_path)
    llm = LLM(
        str(tmp_path),
        device="cpu",
        block_size=4,
        max_model_len=64,
        max_num_seqs=8,
        max_num_batched_tokens=100,
    )
    runner = llm.engine.runner
    for cache in runner.kv_caches:
        cache.normal_()
    before = [c.clone() for c in runner.kv_caches]
    runner.warm_up(runner.kv_caches)
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches, strict=True))
    one_block = llm.engine._allocate_kv_cache(1)  # what the engine profiles memory with
    runner.warm_up(one_block)
    assert all(not c.any() for c in one_block)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model, [3, 4, 5], 4)[0]
