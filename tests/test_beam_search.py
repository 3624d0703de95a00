"""LLM.beam_search against a reference beam search over transformers' float64 logprobs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hwlm import LLM, BeamSearchParams
from hwlm.sampling.beam_search import beam_search_score
from tests.tiny_models import EOS, build_tiny_model

PROMPTS = [[5, 17, 230, 41, 9], [77, 300, 12, 8, 8, 61, 2, 90]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> tuple:
    folder = tmp_path_factory.mktemp("beam-llama")
    model = build_tiny_model("llama", folder)
    device = str(request.config.getoption("--device"))
    return LLM(str(folder), device=device, num_kv_blocks=256), model


def _reference(model: Any, prompt: list[int], width: int, steps: int, penalty: float) -> list:
    """Plain beam search: every beam extended by its 2*width best tokens; EOS ends a beam."""

    def score(beam: tuple[list[int], float]) -> float:
        tokens, cum = beam
        length = len(tokens) - (1 if tokens[-1] == EOS else 0)
        return cum / length**penalty

    live: list[tuple[list[int], float]] = [(list(prompt), 0.0)]
    done: list[tuple[list[int], float]] = []
    for _ in range(steps):
        if not live:
            break
        candidates = []
        for tokens, cum in live:
            with torch.no_grad():
                row = model(torch.tensor([tokens])).logits[0, -1].double()
            lp = torch.log_softmax(row, -1).numpy()
            for t in np.argsort(-lp)[: 2 * width].tolist():
                beam = ([*tokens, t], cum + float(lp[t]))
                (done if t == EOS else candidates).append(beam)
        live = sorted(candidates, key=score, reverse=True)[:width]
    return sorted(done + live, key=score, reverse=True)[:width]


@pytest.mark.parametrize(("width", "penalty"), [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_beam_search_matches_reference(tiny: tuple, width: int, penalty: float) -> None:
    llm, model = tiny
    params = BeamSearchParams(beam_width=width, max_tokens=4, length_penalty=penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert len(outputs) == len(PROMPTS)
    tok = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        want = _reference(model, prompt, width, 4, penalty)
        assert [s.tokens for s in out.sequences] == [w[0] for w in want]
        for seq, (_, cum) in zip(out.sequences, want, strict=True):
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-3)
            assert seq.tokens[: len(prompt)] == prompt
            assert seq.text == tok.decode(seq.tokens)
            assert len(seq.logprobs) == len(seq.tokens) - len(prompt)


def test_beam_width_one_is_greedy(tiny: tuple) -> None:
    from hwlm import SamplingParams

    llm, _ = tiny
    greedy = llm.generate(
        {"prompt_token_ids": PROMPTS[0]},
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    beam = llm.beam_search(
        [{"prompt_token_ids": PROMPTS[0]}], BeamSearchParams(beam_width=1, max_tokens=5)
    )
    assert beam[0].sequences[0].tokens[len(PROMPTS[0]) :] == greedy.token_ids


def test_score_and_validation() -> None:
    assert beam_search_score([1, 2, 3, EOS], -6.0, EOS, 1.0) == pytest.approx(-2.0)
    assert beam_search_score([1, 2, 3, 4], -8.0, EOS, 0.5) == pytest.approx(-8.0 / math.sqrt(4))
    with pytest.raises(ValueError, match="beam_width must be at least 1"):
        BeamSearchParams(beam_width=0, max_tokens=3)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        BeamSearchParams(beam_width=2, max_tokens=0)


def test_string_prompts(tiny: tuple, tmp_path: Path) -> None:
    llm, _ = tiny
    out = llm.beam_search(["hello there"], BeamSearchParams(beam_width=2, max_tokens=3))
    assert len(out[0].sequences) == 2
    assert out[0].sequences[0].text.startswith("hello there")
