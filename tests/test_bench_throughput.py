"""`hwlm bench throughput`: its warm-up and a whole run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hwlm.bench.throughput import warm_up_prompts
from hwlm.cli.main import main


def test_warm_up_fills_one_step_with_whole_prompts() -> None:
    prompts = [[1] * n for n in (30, 50, 40, 60, 10)]
    assert warm_up_prompts(prompts, 100) == prompts[:3]  # 120 tokens: the first to reach 100
    assert warm_up_prompts(prompts, 10) == prompts[:2]  # never fewer than two
    assert warm_up_prompts(prompts, 10_000) == prompts  # the whole workload is less than a step


@pytest.mark.parametrize("structured", [False, True])
def test_a_run_on_the_tiny_model(tmp_path: Path, structured: bool) -> None:
    out = tmp_path / "result.json"
    argv = ["bench", "throughput", "--model", "hwlm-tiny", "--device", "cpu"]
    argv += ["--num-prompts", "6", "--input-len-min", "8", "--input-len-max", "40"]
    argv += ["--output-len", "5", "--max-num-batched-tokens", "64", "--output-json", str(out)]
    if structured:
        argv += ["--structured-json", "builtin"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["name"] for r in results] == (["hwlm", "hwlm+json"] if structured else ["hwlm"])
    assert all(r["output_tokens_per_s"] > 0 for r in results)
