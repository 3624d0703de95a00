"""``--data-parallel-size`` without processes: the balancer (load, then prefix), the merged stats,
per-core metrics, admission over N cores, the cores' placements, and the settings' checks."""

from __future__ import annotations

import argparse

import pytest

from hwlm.engine import dp_placement
from hwlm.engine.dp_balancer import PREFIX_LOAD_SLACK, DataParallelBalancer
from hwlm.engine.dp_stats import merge_stats
from hwlm.engine.messages import EngineStats, HistogramCounts
from hwlm.engine_args import EngineArgs

BLOCK = 4


def stats(waiting: int = 0, running_seqs: int = 0, usage: float = 0.0) -> EngineStats:
    return EngineStats(num_waiting=waiting, num_running_seqs=running_seqs, kv_cache_usage=usage)


def balancer(count: int = 2, prefix_aware: bool = True) -> DataParallelBalancer:
    return DataParallelBalancer(count, BLOCK, [64] * count, prefix_aware=prefix_aware)


def route(b: DataParallelBalancer, reports: list[EngineStats], prompt: list[int]) -> int:
    core = b.choose(reports, prompt)
    b.sent(core, 1, prompt)
    return core


def test_least_loaded_core_wins() -> None:
    b = balancer()
    assert b.choose([stats(waiting=3, running_seqs=2), stats(running_seqs=4)], [1]) == 1
    assert b.choose([stats(running_seqs=1), stats(waiting=1, running_seqs=4)], [1]) == 0


def test_kv_usage_breaks_ties() -> None:
    b = balancer()
    assert b.choose([stats(2, 2, usage=0.7), stats(2, 2, usage=0.2)], [1]) == 1
    assert b.choose([stats(2, 2, usage=0.1), stats(2, 2, usage=0.2)], [1]) == 0


def test_what_was_sent_counts_until_the_next_report() -> None:
    b = balancer(prefix_aware=False)
    reports = [stats(), stats(running_seqs=2)]
    cores = [route(b, reports, [i]) for i in range(4)]
    # Core 0 takes two (loads 0 and 1 against 2); at 2 against 2 core 1 has its turn; then
    # core 0 again (2 against 3).
    assert cores == [0, 0, 1, 0]
    reports[0] = stats(running_seqs=9)  # core 0's new report replaces what it was sent
    assert b.choose(reports, [8]) == 1
    reports[0] = stats()  # core 0 reports again: idle, what it was sent finished
    assert b.choose(reports, [9]) == 0


def test_idle_cores_take_turns() -> None:
    b = balancer(count=3, prefix_aware=False)
    idle = [stats(), stats(), stats()]
    cores = []
    for i in range(6):
        idle = [stats(), stats(), stats()]  # every request ended before the next arrived
        cores.append(route(b, idle, [i]))
    assert cores == [0, 1, 2, 0, 1, 2]


def test_repeated_prefix_goes_to_the_same_core() -> None:
    b = balancer()
    shared = list(range(100, 100 + 3 * BLOCK))
    first = route(b, [stats(), stats()], [*shared, 1])
    other = route(b, [stats(), stats()], [7] * (3 * BLOCK))  # round-robin: the other core
    assert other != first
    for tail in range(2, 6):  # idle cores would take turns; the prefix keeps them on one
        assert route(b, [stats(), stats()], [*shared, tail]) == first
    assert route(b, [stats(), stats()], [7] * (3 * BLOCK) + [5]) == other


def test_prefix_gives_way_to_a_much_less_loaded_core() -> None:
    b = balancer()
    shared = list(range(3 * BLOCK))
    first = route(b, [stats(), stats()], shared)
    busy = [stats(), stats()]
    busy[first] = stats(running_seqs=PREFIX_LOAD_SLACK)
    assert b.choose(busy, shared) == first  # within the slack: the cache wins
    busy[first] = stats(running_seqs=PREFIX_LOAD_SLACK + 1)
    assert b.choose(busy, shared) == 1 - first  # beyond it: balance wins


def test_a_prompt_shorter_than_a_block_is_balanced_by_load() -> None:
    b = balancer()
    first = route(b, [stats(), stats()], [1, 2])
    assert route(b, [stats(), stats()], [1, 2]) != first


def test_prefix_memory_is_bounded_per_core() -> None:
    b = DataParallelBalancer(2, BLOCK, [2, 2])
    old = list(range(2 * BLOCK))
    first = route(b, [stats(), stats()], old)
    for i in range(3):  # three more prompts on the same core push the old blocks out
        b.sent(first, 1, [1000 + i] * (2 * BLOCK))
    assert b.prefix is not None
    assert b.prefix.matched_blocks(b.prefix.block_hashes(old)) == [0, 0]


def test_merged_stats_sum_counts_and_share_kv_usage() -> None:
    a = EngineStats(
        num_running=2, num_waiting=1, num_running_seqs=3, num_free_blocks=10, num_blocks=40,
        prompt_tokens=5, finished={"stop": 1}, ttft=HistogramCounts([1, 0], 0.5, 1),
    )  # fmt: skip
    b = EngineStats(
        num_running=1, num_free_blocks=40, num_blocks=40, prompt_tokens=7,
        finished={"stop": 2, "length": 1}, ttft=HistogramCounts([0, 2], 1.5, 2),
    )  # fmt: skip
    merged = merge_stats([a, b])
    assert (merged.num_running, merged.num_waiting, merged.num_running_seqs) == (3, 1, 3)
    assert (merged.num_blocks, merged.num_free_blocks, merged.prompt_tokens) == (80, 50, 12)
    assert merged.kv_cache_usage == pytest.approx(30 / 80)
    assert merged.finished == {"stop": 3, "length": 1}
    assert merged.ttft == HistogramCounts([1, 2], 2.0, 3)


def test_cpu_cores_are_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dp_placement.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    placements = dp_placement.plan_placements(EngineArgs("hwlm-tiny", device="cpu"), 2)
    assert [p.cpus for p in placements] == [(0, 1), (2, 3)]
    assert [dict(p.env)["OMP_NUM_THREADS"] for p in placements] == ["2", "2"]
    assert [p.title for p in placements] == ["hwlm::engine0", "hwlm::engine1"]
    with pytest.raises(ValueError, match="needs at least 8 CPU cores, this process may use 5"):
        dp_placement.plan_placements(EngineArgs("hwlm-tiny", device="cpu"), 8)


def test_gpus_are_split_by_tensor_parallel_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dp_placement, "_backend_name", lambda device: "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    args = EngineArgs("hwlm-tiny", device="cuda")
    placements = dp_placement.plan_placements(args, 4)
    assert [dict(p.env) for p in placements] == [
        {"CUDA_VISIBLE_DEVICES": d} for d in ("4", "5", "6", "7")
    ]
    setattr(args, "tensor_parallel_size", 2)  # noqa: B010 (a field of the TP work)
    placements = dp_placement.plan_placements(args, 2)
    assert [dict(p.env)["CUDA_VISIBLE_DEVICES"] for p in placements] == ["4,5", "6,7"]
    with pytest.raises(ValueError, match="needs 6 cuda devices, this process sees 4"):
        dp_placement.plan_placements(args, 3)


def test_offline_llm_refuses_data_parallel() -> None:
    from hwlm import LLM

    with pytest.raises(ValueError, match="data_parallel_size=2 is for hwlm serve"):
        LLM("hwlm-tiny", device="cpu", data_parallel_size=2)


def test_serve_flags() -> None:
    from hwlm.cli.serve import _check_data_parallel, add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    assert parser.parse_args(["serve", "-dp", "3"]).data_parallel_size == 3
    assert parser.parse_args(["serve", "--data-parallel-size", "2"]).data_parallel_size == 2
    assert parser.parse_args(["serve"]).data_parallel_size == 1
    with pytest.raises(ValueError, match="needs the engine in its own process"):
        _check_data_parallel(parser.parse_args(["serve", "-dp", "2", "--no-engine-process"]))
    with pytest.raises(ValueError, match="must be at least 1, got 0"):
        _check_data_parallel(parser.parse_args(["serve", "-dp", "0"]))


def test_per_core_metrics_only_with_several_cores() -> None:
    from hwlm.engine.serving_metrics import MetricsSnapshot
    from hwlm.server.async_engine import EngineStats as ServerStats
    from hwlm.server.prometheus import metrics_registry, render_metrics
    from tests.server_helpers import metric, parse_metrics

    cores = [
        EngineStats(num_running=2, kv_cache_usage=0.5, prompt_tokens=9, finished={"stop": 3}),
        EngineStats(num_waiting=1, generation_tokens=4, finished={"length": 1, "abort": 1}),
    ]
    total = ServerStats(
        num_running=2, num_waiting=1, num_free_blocks=0, num_blocks=0, num_streams=0
    )

    def page(core_stats: list[EngineStats]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        registry = metrics_registry("m", lambda: total, MetricsSnapshot, lambda: core_stats)
        return parse_metrics(render_metrics(registry).decode())

    samples = page(cores)
    assert metric(samples, "hwlm:num_requests_running") == 2  # the sum, unlabelled by engine
    assert metric(samples, "hwlm:engine_num_requests_running", engine="0") == 2
    assert metric(samples, "hwlm:engine_num_requests_waiting", engine="1") == 1
    assert metric(samples, "hwlm:engine_kv_cache_usage_perc", engine="0") == 0.5
    assert metric(samples, "hwlm:engine_prompt_tokens_total", engine="0") == 9
    assert metric(samples, "hwlm:engine_generation_tokens_total", engine="1") == 4
    assert metric(samples, "hwlm:engine_request_success_total", engine="0") == 3
    assert metric(samples, "hwlm:engine_request_success_total", engine="1") == 2
    assert not [name for name, _ in page(cores[:1]) if name.startswith("hwlm:engine_")]


def test_admission_holds_every_cores_queue() -> None:
    from hwlm.server.admission import ServerLimits, check_capacity
    from hwlm.server.errors import APIError

    limits = ServerLimits(max_waiting_requests=4, engine_cores=2)
    check_capacity(7, limits, draining=False)  # 8 waiting: two cores' bounds
    with pytest.raises(APIError, match="overloaded") as full:
        check_capacity(8, limits, draining=False)
    assert full.value.status == 503
    with pytest.raises(APIError, match="at most 4 sequences") as big:
        check_capacity(0, limits, draining=False, incoming=5)  # a request runs on one core
    assert big.value.status == 400
