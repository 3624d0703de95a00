"""Sampling controls end to end on a tiny Llama, checked against transformers' logits (float64)
and the float64 references of tests/sampling_reference.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hwlm import LLM, SamplingParams
from hwlm.text.tokenizer import decode_tokens
from tests import sampling_reference as ref
from tests.tiny_models import EOS, VOCAB, build_tiny_model

PROMPT = [5, 17, 230, 41, 9, 77, 300, 12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("sampling-llama")
    return folder, build_tiny_model("llama", folder)


@pytest.fixture(scope="module")
def llm(tiny: tuple[Path, Any], request: pytest.FixtureRequest) -> LLM:
    device = str(request.config.getoption("--device"))
    return LLM(str(tiny[0]), device=device, block_size=16, num_kv_blocks=256, max_model_len=256)


@pytest.fixture(scope="module")
def stepwise(tiny: tuple[Path, Any], request: pytest.FixtureRequest) -> LLM:
    """One step at a time on every device (GPUs overlap steps by default, so a step's blocks
    are allocated a step earlier): for the tests that count blocks after each step."""
    device = str(request.config.getoption("--device"))
    return LLM(
        str(tiny[0]),
        device=device,
        block_size=16,
        num_kv_blocks=256,
        max_model_len=256,
        async_scheduling=False,
    )


def _hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _generate(llm: LLM, prompt: list[int], params: SamplingParams) -> Any:
    return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]


def test_penalties_bias_and_allowed_tokens_match_reference(llm: LLM, tiny: tuple) -> None:
    model = tiny[1]
    allowed = sorted(np.random.default_rng(0).choice(VOCAB, 200, replace=False).tolist())
    bias = {allowed[3]: 1.5, allowed[10]: -2.0}
    params = SamplingParams(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        repetition_penalty=1.6,
        frequency_penalty=0.5,
        presence_penalty=0.4,
        logit_bias=bias,
        allowed_token_ids=allowed,
    )
    out = _generate(llm, PROMPT, params).outputs[0]
    tokens: list[int] = []
    for _ in range(12):
        row = _hf_logits(model, PROMPT + tokens)[-1]
        row = ref.logit_bias(ref.allowed(row, allowed), bias)
        row = ref.penalties(row, PROMPT, tokens, 1.6, 0.5, 0.4)
        tokens.append(int(np.argmax(row)))
    assert out.token_ids == tokens
    assert len(set(tokens)) > 6  # the penalties really act: greedy alone repeats on this model


def test_repetition_penalty_changes_greedy_output(llm: LLM) -> None:
    plain = _generate(llm, PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    penal = _generate(
        llm,
        PROMPT,
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=2.0),
    )
    assert plain.outputs[0].token_ids != penal.outputs[0].token_ids


def test_bad_words_never_generated(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    plain = _generate(llm, PROMPT, greedy).outputs[0].token_ids
    word = tok.decode([plain[0]]).strip()
    pair = plain[1:3]  # a two-token word from the greedy output
    pair_text = tok.decode(pair)
    params = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, bad_words=[word, pair_text]
    )
    out = _generate(llm, PROMPT, params).outputs[0].token_ids
    banned = [tok.encode(v, add_special_tokens=False) for v in (word, " " + word)]
    for ids in banned:
        if len(ids) == 1:
            assert ids[0] not in out
    assert out[0] != plain[0]
    pair_ids = tok.encode(pair_text.lstrip(), add_special_tokens=False)
    assert not any(out[i : i + len(pair_ids)] == pair_ids for i in range(len(out)))


def test_min_tokens_masks_eos(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=4, logit_bias={EOS: 100.0})
    out = _generate(llm, PROMPT, params).outputs[0]
    assert EOS not in out.token_ids[:4]
    assert out.token_ids[4] == EOS and len(out.token_ids) == 5
    assert out.finish_reason == "stop"


def test_min_tokens_masks_eos_with_ignore_eos(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0, max_tokens=7, min_tokens=4, ignore_eos=True, logit_bias={EOS: 100.0}
    )
    out = _generate(llm, PROMPT, params).outputs[0]
    assert EOS not in out.token_ids[:4]
    assert out.token_ids[4:] == [EOS] * 3  # allowed from then on, and it does not stop
    assert out.finish_reason == "length"


def _greedy_text(llm: LLM, n: int = 24) -> tuple[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, skip_special_tokens=True)
    out = _generate(llm, PROMPT, params).outputs[0]
    return out.text, out.token_ids


def _stop_candidate(text: str) -> str:
    for start in range(4, len(text) - 3):
        piece = text[start : start + 3]
        if piece.isascii() and piece.isprintable() and piece.strip() == piece:
            return piece
    pytest.skip("no printable 3-character piece in the greedy text")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_text(llm: LLM, include: bool) -> None:
    text, _ = _greedy_text(llm)
    stop = _stop_candidate(text)
    index = text.find(stop)
    params = SamplingParams(
        temperature=0,
        max_tokens=24,
        ignore_eos=True,
        stop=["never-in-output-zz", stop],
        include_stop_str_in_output=include,
    )
    out = _generate(llm, PROMPT, params).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (text[: index + len(stop)] if include else text[:index])


@pytest.mark.parametrize("before, after", [(2, 2), (1, 6)])
def test_stop_string_straddling_tokens(llm: LLM, before: int, after: int) -> None:
    """A stop string that begins in an earlier token than the one completing it is found
    (the check reads the new text plus what a stop string could span before it)."""
    text, ids = _greedy_text(llm)
    ends = [len(llm.get_tokenizer().decode(ids[: i + 1])) for i in range(len(ids))]
    for boundary in ends[2:]:
        stop = text[boundary - before : boundary + after]
        if len(stop) == before + after and text.find(stop) == boundary - before:
            if stop.isprintable() and stop.strip() == stop and "\ufffd" not in stop:
                break
    else:
        pytest.skip("no printable stop string across a token boundary in the greedy text")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    out = _generate(llm, PROMPT, params).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: boundary - before]


def test_stop_string_streamed_text_never_shows_it(llm: LLM) -> None:
    text, _ = _greedy_text(llm)
    stop = _stop_candidate(text)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop)
    engine.add_request("stream-stop", {"prompt_token_ids": PROMPT}, params, stream=True)
    texts = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
    final = texts[-1]
    assert final == text[: text.find(stop)]
    assert all(stop not in t and final.startswith(t) for t in texts)


def test_stop_token_ids(llm: LLM) -> None:
    _, greedy = _greedy_text(llm)
    stop_token = greedy[5]
    first = greedy.index(stop_token)
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_token]
    )
    out = _generate(llm, PROMPT, params).outputs[0]
    assert out.token_ids == greedy[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token


def test_n4_shares_prompt_blocks_and_samples_differ(stepwise: LLM) -> None:
    engine = stepwise.engine
    bm = engine.block_manager
    prompt = [int(t) for t in np.random.default_rng(1).integers(10, VOCAB, 64)]
    free_before = bm.num_free_blocks
    params = SamplingParams(n=4, temperature=1.0, max_tokens=20, ignore_eos=True)
    engine.add_request("n4", {"prompt_token_ids": prompt}, params)
    engine.step()  # the 64-token prefill, the fork into 4 samples, their first tokens
    seqs = engine._requests["n4"]
    assert len(seqs) == 4
    prompt_blocks = list(seqs[0].block_ids)
    assert len(prompt_blocks) == 4
    assert all(s.block_ids == prompt_blocks for s in seqs)
    assert [bm.blocks[b].ref_count for b in prompt_blocks] == [4] * 4
    assert free_before - bm.num_free_blocks == 4  # the prompt is held once
    engine.step()  # first decode: each sample writes position 64, in a block of its own
    assert all(s.block_ids[:4] == prompt_blocks for s in seqs)
    assert [bm.blocks[b].ref_count for b in prompt_blocks] == [4] * 4
    assert free_before - bm.num_free_blocks == 4 + 4
    bm.check_invariants(seqs)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    texts = [c.text for c in outputs[0].outputs]
    assert [c.index for c in outputs[0].outputs] == [0, 1, 2, 3]
    assert len(set(texts)) == 4
    assert bm.num_free_blocks == free_before


def test_forks_copy_a_shared_partial_block_on_write(stepwise: LLM) -> None:
    """A 70-token prompt ends inside a block: each sample but the last gets a copy of it. At the
    lowest temperature every sample then continues exactly like greedy, so the copied KV is
    right."""
    llm = stepwise
    engine = llm.engine
    bm = engine.block_manager
    prompt = [int(t) for t in np.random.default_rng(2).integers(10, VOCAB, 70)]
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    expected = _generate(llm, prompt, greedy).outputs[0].token_ids
    assert llm.reset_prefix_cache()
    free_before = bm.num_free_blocks
    params = SamplingParams(n=3, temperature=0.01, max_tokens=14, ignore_eos=True, seed=0)
    engine.add_request("cow", {"prompt_token_ids": prompt}, params)
    engine.step()
    assert free_before - bm.num_free_blocks == 5
    engine.step()
    seqs = engine._requests["cow"]
    assert free_before - bm.num_free_blocks == 4 + 3  # 4 shared full blocks, 3 partial ones
    assert len({s.block_ids[4] for s in seqs}) == 3
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert [c.token_ids for c in outputs[0].outputs] == [expected] * 3


def test_best_of_keeps_the_most_likely(llm: LLM) -> None:
    common = dict(temperature=1.0, max_tokens=8, ignore_eos=True, seed=3)
    every = _generate(llm, PROMPT, SamplingParams(n=5, **common)).outputs
    best = _generate(llm, PROMPT, SamplingParams(n=2, best_of=5, **common)).outputs
    ranked = sorted(every, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert len({tuple(c.token_ids) for c in every}) == 5


def test_seed_reproducible_in_any_batch(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_k=40, max_tokens=10, ignore_eos=True, seed=42)
    alone = _generate(llm, PROMPT, params).outputs[0].token_ids
    others = [[9, 8, 7, 6], [300, 301], list(range(40, 90))]
    prompts = [{"prompt_token_ids": p} for p in [others[0], PROMPT, *others[1:]]]
    mixed = [
        SamplingParams(temperature=0.8, max_tokens=12),
        params,
        SamplingParams(temperature=0, max_tokens=5),
        SamplingParams(top_p=0.5, seed=7, repetition_penalty=1.2, max_tokens=10),
    ]
    outs = llm.generate(prompts, mixed, use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(**{**vars(params), "seed": 43})
    assert _generate(llm, PROMPT, other_seed).outputs[0].token_ids != alone


def test_sample_logprobs_and_ranks_match_transformers(llm: LLM, tiny: tuple) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=5, logprobs=3)
    out = _generate(llm, PROMPT, params).outputs[0]
    rows = _hf_logits(tiny[1], PROMPT + out.token_ids)[len(PROMPT) - 1 : -1]
    total = 0.0
    for token, entry, row in zip(out.token_ids, out.logprobs, rows, strict=True):
        lp = ref.log_softmax(row)
        order = np.argsort(-lp)[:3].tolist()
        assert set(entry) == set(order) | {token}
        for t in order:
            assert entry[t].rank == order.index(t) + 1
            assert entry[t].logprob == pytest.approx(lp[t], abs=1e-4)
        assert entry[token].rank == int((lp > lp[token]).sum()) + 1
        assert entry[token].logprob == pytest.approx(lp[token], abs=1e-4)
        total += lp[token]
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)


@pytest.mark.parametrize("chunked", [False, True])
def test_prompt_logprobs_match_transformers(llm: LLM, tiny: tuple, chunked: bool) -> None:
    target = llm
    if chunked:
        target = LLM(str(tiny[0]), device="cpu", block_size=4, max_num_batched_tokens=5)
    prompt = PROMPT * 2
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    lps = _hf_logits(tiny[1], prompt)
    for _ in range(2):  # the second run would hit the prefix cache; prompt logprobs need compute
        got = _generate(target, prompt, params).prompt_logprobs
        assert got is not None and len(got) == len(prompt) and got[0] is None
        for pos in range(1, len(prompt)):
            lp = ref.log_softmax(lps[pos - 1])
            entry = got[pos]
            assert entry is not None
            token = prompt[pos]
            top = np.argsort(-lp)[:2].tolist()
            assert set(entry) == set(top) | {token}
            assert entry[token].logprob == pytest.approx(lp[token], abs=1e-4)
            assert entry[token].rank == int((lp > lp[token]).sum()) + 1


def test_generation_config_defaults(tmp_path: Path) -> None:
    build_tiny_model("llama", tmp_path)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.5, "top_k": 5, "max_new_tokens": 7, "do_sample": True})
    )
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.5, 5, 7)
    assert defaults.top_p == 1.0
    assert llm.engine.sampling_defaults == {"temperature": 0.5, "top_k": 5, "max_tokens": 7}
    out = llm.generate({"prompt_token_ids": PROMPT}, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 or out.finish_reason == "stop"


def test_engine_rejects_ids_outside_the_vocabulary(llm: LLM) -> None:
    cases = [
        (SamplingParams(logit_bias={VOCAB: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[1, VOCAB + 5]), "allowed_token_ids"),
        (SamplingParams(stop_token_ids=[VOCAB]), "stop_token_ids"),
        (SamplingParams(logprobs=21), "logprobs must be in [0, 20]"),
        (SamplingParams(prompt_logprobs=-1), "prompt_logprobs must be in [0, 20]"),
    ]
    for params, name in cases:
        with pytest.raises(ValueError, match=f"^{name.split()[0]}") as info:
            llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)
        assert name in str(info.value)
        if "vocabulary" in str(info.value):
            assert f"[0, {VOCAB})" in str(info.value)
    with pytest.raises(ValueError, match="best_of must equal n=1 when streaming"):
        llm.engine.add_request("s", PROMPT, SamplingParams(best_of=2), stream=True)
    assert not llm.engine.has_unfinished_requests()


def test_spaces_between_special_tokens_reaches_the_tokenizer() -> None:
    calls: list[dict] = []

    class Recorder:
        def decode(self, ids: list[int], **kwargs: Any) -> str:
            calls.append(kwargs)
            return "x"

    decode_tokens(
        Recorder(), [1, 2], skip_special_tokens=False, spaces_between_special_tokens=False
    )
    decode_tokens(Recorder(), [1, 2], skip_special_tokens=False)
    assert calls[0]["spaces_between_special_tokens"] is False
    assert calls[1].get("spaces_between_special_tokens", True) is True


def test_parallel_samples_survive_preemption(tiny: tuple) -> None:
    """Too few KV blocks for all samples at once: some are preempted and recomputed; every
    sample still finishes with the tokens its seed gives when blocks are plentiful."""
    params = SamplingParams(n=3, temperature=1.0, max_tokens=40, ignore_eos=True, seed=9)
    prompt = [int(t) for t in np.random.default_rng(3).integers(10, VOCAB, 30)]
    roomy = LLM(str(tiny[0]), device="cpu", block_size=4, num_kv_blocks=200)
    want = _generate(roomy, prompt, params).outputs
    tight = LLM(str(tiny[0]), device="cpu", block_size=4, num_kv_blocks=30)
    got = _generate(tight, prompt, params).outputs
    assert tight.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert tight.engine.block_manager.num_free_blocks == 30
