"""Piecewise CUDA graphs of prefill and mixed steps (backends/cuda_piecewise.py), on a GPU: a
workload of staggered arrivals and chunked prefills (every step mixed) gives, replayed from the
graphs, the tokens and logprobs it gives eagerly (``enforce_eager``), and the graphs ran."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwlm import LLM, SamplingParams
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)


def staggered(llm: LLM, prompts: list[list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    """Add one prompt per engine step, so that prefills run beside decodes; return each
    request's tokens and their logprobs."""
    engine = llm.engine
    done: dict[str, tuple[list[int], list[float]]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, PARAMS)
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                lps = [entry[t].logprob for entry, t in zip(c.logprobs, c.token_ids, strict=True)]
                done[out.request_id] = (list(c.token_ids), lps)
    return done


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt"])
def test_mixed_steps_replay_as_they_run_eagerly(tmp_path: Path, arch: str) -> None:
    build_tiny_model(arch, tmp_path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (int(n),), generator=g).tolist() for n in (3, 40, 17, 90, 5)]
    settings = dict(device="cuda", dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    eager = staggered(LLM(str(tmp_path), enforce_eager=True, **settings), prompts)
    llm = LLM(str(tmp_path), **settings)
    runner = llm.engine.runner.step_runner
    assert runner is not None
    replays: list[int] = []
    run = runner.run

    def counted(ids: torch.Tensor, pos: torch.Tensor, md: object) -> torch.Tensor:
        replays.append(int(ids.shape[0]))
        return run(ids, pos, md)  # type: ignore[arg-type]

    runner.run = counted  # type: ignore[method-assign]
    graphed = staggered(llm, prompts)
    assert len(replays) >= len(prompts)  # every admitting step (a 90-token prompt: 2 chunks)
    assert graphed.keys() == eager.keys()
    for rid, (tokens, lps) in eager.items():
        assert graphed[rid][0] == tokens, rid
        assert graphed[rid][1] == pytest.approx(lps, abs=1e-4), rid
