"""Overlapped steps (``async_scheduling``): the same outputs as one step at a time, with step
n + 1 launched before step n's tokens are read back.

On the CPU nothing actually overlaps (the forward runs on the host), but every code path of the
overlapped engine runs: tokens in flight fed to the next step on the device, sequences that a
token in flight will end by length left out, rows computed for sequences that stopped in the step
before and discarded, aborts while a step is in flight, and the drains before steps that need the
generated tokens on the host (penalties, bad words, min_tokens) or might preempt.
"""

from __future__ import annotations

from typing import Any

import pytest

from hwlm import LLM, SamplingParams
from hwlm.outputs import RequestOutput
from hwlm.sampling.sampler import SampledBatch

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "The future of AI is",
    "a b c d e f g h i j k l m n o p",
    "The capital of France is a city that",  # shares a prefix with the second
    "x",
]


def _engines(device: str, **kwargs: Any) -> tuple[LLM, LLM]:
    # float32: on a GPU a batch one row larger may round differently in bfloat16.
    settings = dict(
        device=device, dtype="float32", max_model_len=256, block_size=8, num_kv_blocks=96
    )
    settings.update(kwargs)
    return (
        LLM("hwlm-tiny", async_scheduling=False, **settings),  # type: ignore[arg-type]
        LLM("hwlm-tiny", async_scheduling=True, **settings),  # type: ignore[arg-type]
    )


def _summary(outputs: list[RequestOutput]) -> list[Any]:
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs
    ]


def _logprobs(outputs: list[RequestOutput]) -> list[float]:
    return [c.cumulative_logprob for o in outputs for c in o.outputs]


def _same(sync: LLM, overlapped: LLM, params: SamplingParams | list[SamplingParams]) -> None:
    a = sync.generate(PROMPTS, params, use_tqdm=False)
    b = overlapped.generate(PROMPTS, params, use_tqdm=False)
    assert _summary(b) == _summary(a)
    assert _logprobs(b) == pytest.approx(_logprobs(a), abs=1e-4)
    for engine in (sync.engine, overlapped.engine):
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def pair(device: str) -> tuple[LLM, LLM]:
    return _engines(device, max_num_batched_tokens=24, max_num_seqs=4)


def test_default_is_off_on_cpu_on_elsewhere(pair: tuple[LLM, LLM]) -> None:
    sync, overlapped = pair
    assert sync.engine.async_scheduling is False and overlapped.engine.async_scheduling is True
    default = LLM("hwlm-tiny", device="cpu", max_model_len=64, num_kv_blocks=16)
    assert default.engine.async_scheduling is False
    if sync.engine.backend.device.type != "cpu":
        assert LLM("hwlm-tiny", max_model_len=64, num_kv_blocks=16).engine.async_scheduling


def test_greedy_lengths_and_chunked_prefill(pair: tuple[LLM, LLM]) -> None:
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 2, 7, 16, 3, 9)
    ]
    _same(*pair, params)


def test_stops_discard_the_extra_row(pair: tuple[LLM, LLM]) -> None:
    sync, overlapped = pair
    free = sync.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    # Stop tokens and strings that occur mid-output: the overlapped engine has already launched
    # the next step for those sequences when it learns they stopped.
    stop_ids = sorted({o.outputs[0].token_ids[4] for o in free})
    _same(sync, overlapped, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=stop_ids))
    stops = [o.outputs[0].text[3:6] for o in free if len(o.outputs[0].text) > 6]
    _same(sync, overlapped, SamplingParams(temperature=0, max_tokens=12, stop=stops))


def test_seeded_sampling_logprobs_and_parallel_samples(pair: tuple[LLM, LLM]) -> None:
    params = SamplingParams(
        temperature=0.9, top_p=0.9, seed=7, max_tokens=10, logprobs=2, ignore_eos=True
    )
    _same(*pair, params)
    _same(*pair, SamplingParams(temperature=0.8, seed=3, n=2, best_of=3, max_tokens=6))
    sync, overlapped = pair
    a = sync.generate(PROMPTS[:2], SamplingParams(max_tokens=3, prompt_logprobs=1, seed=1))
    b = overlapped.generate(PROMPTS[:2], SamplingParams(max_tokens=3, prompt_logprobs=1, seed=1))
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for left, right in zip(x.prompt_logprobs or [], y.prompt_logprobs or [], strict=True):
            assert (left is None) == (right is None)
            if left is not None and right is not None:
                assert left.keys() == right.keys()
                for token, lp in left.items():
                    assert right[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


def test_samplers_that_read_the_output_drain_first(pair: tuple[LLM, LLM]) -> None:
    params = SamplingParams(
        temperature=0, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=4
    )
    _same(*pair, params)
    _same(*pair, SamplingParams(temperature=0, max_tokens=8, bad_words=["the", "a b"]))


def test_a_full_cache_drains_then_preempts(device: str) -> None:
    sync, overlapped = _engines(device, num_kv_blocks=12, max_num_seqs=6)
    _same(sync, overlapped, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert overlapped.engine.scheduler.num_preemptions > 0


def test_step_n_plus_1_launches_before_step_n_is_read(
    pair: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of events: launch, launch, read, launch, read, ... (one step in flight)."""
    _, overlapped = pair
    engine = overlapped.engine
    events: list[str] = []
    launch, to_output = engine.runner.launch, SampledBatch.to_output

    def logged_launch(batch):  # noqa: ANN001, ANN202
        events.append("launch")
        return launch(batch)

    def logged_read(self):  # noqa: ANN001, ANN202
        events.append("read")
        return to_output(self)

    monkeypatch.setattr(engine.runner, "launch", logged_launch)
    monkeypatch.setattr(SampledBatch, "to_output", logged_read)
    overlapped.generate(["x y"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    # The prompt step, then 5 decode steps; the sixth token ends it by length, so no step is
    # launched for it.
    assert events == ["launch", "launch", "read"] + ["launch", "read"] * 4 + ["read"]


def test_abort_with_a_step_in_flight(pair: tuple[LLM, LLM]) -> None:
    _, overlapped = pair
    engine = overlapped.engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("keep", "The future of AI is", params, stream=True)
    engine.add_request("drop", "Hello, my name is", params, stream=True)
    seen: dict[str, list[int]] = {"keep": [], "drop": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id] = out.outputs[0].token_ids
        if len(seen["drop"]) == 3 and engine._requests.get("drop"):
            engine.abort_request("drop")  # its next token is being computed right now
    assert len(seen["keep"]) == 30 and len(seen["drop"]) == 3
    engine.step()  # nothing left in flight
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    expected = overlapped.generate("The future of AI is", params, use_tqdm=False)[0]
    assert seen["keep"] == expected.outputs[0].token_ids
