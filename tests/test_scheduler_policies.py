"""The scheduler's policies on an engine (no server).

- Share rule: while one request group holds every running sequence (64 prompts x n 16, forked
  past max_num_seqs), a small request from another group is admitted at once and finishes within
  a few steps; without the rule it waits.
- Priority policy: waiting requests run lowest priority value first (then by arrival), the
  highest value is preempted first, and a non-zero priority under fcfs is a clear error.
"""

from __future__ import annotations

import pytest

from hwlm.engine.llm_engine import LLMEngine
from hwlm.engine_args import EngineArgs
from hwlm.sampling_params import SamplingParams


@pytest.fixture(scope="module", params=[False, True], ids=["one-step", "overlapped"])
def engine(device: str, request: pytest.FixtureRequest) -> LLMEngine:
    """With and without overlapped steps (a sequence with a token in flight is never preempted,
    so the overlapped engine must finish its step first when the share rule wants a seat)."""
    return LLMEngine(
        EngineArgs(
            model="hwlm-tiny",
            load_format="dummy",
            device=device,
            max_num_seqs=256,
            async_scheduling=request.param,
        )
    )


def _steps_until_small_finishes(
    engine: LLMEngine, share: float, limit: int, group: str | None = "big"
) -> int | None:
    engine.scheduler.max_request_share = share
    big = SamplingParams(n=16, max_tokens=2040, ignore_eos=True)
    for i in range(64):  # one request group, as the server makes of one response's prompts
        engine.add_request(f"big-{i}", [1, 2, 3], big, group=group)
    for _ in range(6):  # the prompts are computed and every sample forked
        engine.step()
    assert len(engine.scheduler.running) > engine.config.max_num_seqs
    engine.add_request("small-0", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    try:
        for step in range(1, limit + 1):
            if any(o.request_id == "small-0" and o.finished for o in engine.step()):
                return step
        return None
    finally:
        for i in range(64):
            engine.abort_request(f"big-{i}")
        engine.abort_request("small-0")
        while engine.has_unfinished_requests():
            engine.step()


def test_a_small_request_takes_a_seat_from_an_over_share_group(engine: LLMEngine) -> None:
    steps = _steps_until_small_finishes(engine, share=0.5, limit=12)
    assert steps is not None and steps <= 6, steps


def test_without_the_share_rule_the_small_request_waits(engine: LLMEngine) -> None:
    assert _steps_until_small_finishes(engine, share=1.0, limit=12) is None


def test_requests_form_a_group_only_when_named(engine: LLMEngine) -> None:
    # 64 requests of 16 sequences each, no group named: each is a group of 16, under its share,
    # so nothing is over the share and the small request waits its turn (ids that look alike
    # are no group).
    assert _steps_until_small_finishes(engine, share=0.5, limit=12, group=None) is None


def _finish_order(engine: LLMEngine, priorities: list[int]) -> list[str]:
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for i, priority in enumerate(priorities):
        engine.add_request(f"r{i}", [1, 2, 3 + i], params, priority=priority)
    order: list[str] = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def test_priority_policy_runs_the_lowest_value_first(device: str) -> None:
    engine = LLMEngine(
        EngineArgs(
            model="hwlm-tiny",
            load_format="dummy",
            device=device,
            max_num_seqs=1,
            scheduling_policy="priority",
        )
    )
    assert _finish_order(engine, [2, 0, 1, 0]) == ["r1", "r3", "r2", "r0"]


def test_fcfs_runs_in_arrival_order_and_refuses_a_priority(engine: LLMEngine) -> None:
    engine.scheduler.max_request_share = 1.0
    # max_num_seqs 256: all run at once and finish together, in arrival order of the outputs.
    assert sorted(_finish_order(engine, [0, 0, 0])) == ["r0", "r1", "r2"]
    with pytest.raises(ValueError, match="scheduling_policy 'priority'"):
        engine.add_request("p", [1, 2], SamplingParams(max_tokens=1), priority=1)


def test_priority_policy_preempts_the_highest_value_first(device: str) -> None:
    engine = LLMEngine(
        EngineArgs(
            model="hwlm-tiny",
            load_format="dummy",
            device=device,
            block_size=16,
            num_kv_blocks=8,
            max_model_len=128,
            scheduling_policy="priority",
        )
    )
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    # The least urgent request arrives first and is running when the others come.
    engine.add_request("lazy", [5] * 40, params, priority=9)
    engine.step()
    engine.add_request("urgent-late", [4] * 40, params, priority=0)
    engine.add_request("normal", [6] * 40, params, priority=1)
    priority = {"urgent-late": 0, "lazy": 9, "normal": 1}
    preemptions = 0
    while engine.has_unfinished_requests():
        before = {s.request_id for s in engine.scheduler.running}
        engine.step()
        waiting = {s.request_id for s in engine.scheduler.waiting}
        for victim in before & waiting:  # preempted this step
            preemptions += 1
            # Only the least urgent of those that were running is ever preempted.
            assert priority[victim] == max(priority[r] for r in before), (victim, before)
    assert preemptions, "the cache was expected to run out"
