"""Where a constrained step's time goes: the G3 workload offline, unconstrained then with the
builtin JSON schema on every request, with the engine's step phases timed by wrappers (host
seconds per step in each) and, when py-spy is on PATH, a profile of the constrained run.

    python ci/profile_structured.py --device cuda [--schema builtin] [--rounds N] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from hwlm import LLM, SamplingParams
from hwlm.bench.datasets import random_token_prompts
from hwlm.bench.structured import load_schema
from hwlm.bench.throughput import WORKLOADS
from hwlm.sampling.structured import MaskStats
from hwlm.sampling.structured.bitmask import MaskJob
from hwlm.sampling_params import StructuredOutputsParams

SECONDS: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` so its calls add to ``SECONDS[label]``."""
    inner: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SECONDS[label] += time.perf_counter() - start
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def instrument(llm: LLM) -> None:
    engine = llm.engine
    runner = engine.runner
    sampler = runner.sampler
    timed(engine, "step_updates", "step (all)")
    timed(engine.scheduler, "schedule", "schedule")
    timed(runner, "prepare", "prepare inputs")
    timed(runner, "_forward", "queue forward")
    timed(sampler, "sample", "sample (queued at once)")
    timed(sampler, "_end", "sample (queued after the masks)")
    timed(sampler.masks, "_compute", "mask fill (on whichever thread fills)")
    timed(MaskJob, "result", "wait for the mask thread")
    timed(engine, "_finish", "finish step (tokens to host, append, stops)")
    timed(engine, "_advance_grammars", "grammar advance")
    timed(engine, "_collect_outputs", "request outputs")
    import hwlm.sampling.sampler as sampler_module

    timed(sampler_module, "apply_bitmask", "apply bitmask (queue)")


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, int]:
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def report(name: str, seconds: float, tokens: int) -> None:
    steps = CALLS["step (all)"]
    print(
        f"== {name}: {tokens / seconds:,.0f} tok/s, {seconds:.2f} s, {steps} steps, "
        f"{1e3 * seconds / max(steps, 1):.2f} ms/step"
    )
    for label, total in SECONDS.most_common():
        print(f"   {1e3 * total / max(steps, 1):7.3f} ms/step  {CALLS[label]:6d} calls  {label}")
    SECONDS.clear()
    CALLS.clear()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workload", default="g3")
    parser.add_argument("--schema", default="builtin")
    parser.add_argument("--num-prompts", type=int, default=0, help="default: the workload's")
    parser.add_argument("--rounds", type=int, default=1, help="alternations of the two runs")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = parser.parse_args()
    w = WORKLOADS[args.workload]
    llm = LLM(
        w["model"],
        load_format="dummy",
        device=args.device,
        max_model_len=w["input_len_max"] + w["output_len"] + 1,
    )
    vocab = llm.engine.model_config.vocab_size
    num = args.num_prompts or w["num_prompts"]
    prompts = random_token_prompts(num, (w["input_len_min"], w["input_len_max"]), vocab, 0)
    plain = [SamplingParams(temperature=0.0, max_tokens=w["output_len"], ignore_eos=True)] * len(
        prompts
    )
    structured = StructuredOutputsParams(json=load_schema(args.schema))
    constrained = [dataclasses.replace(p, structured_outputs=structured) for p in plain]
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], constrained[:2], use_tqdm=False)
    instrument(llm)
    masks = llm.engine.runner.sampler.masks
    rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    for _ in range(args.rounds):
        for name, params in (("unconstrained", plain), ("constrained", constrained)):
            run(llm, prompts, params)  # warm
            SECONDS.clear()
            CALLS.clear()
            masks.stats = MaskStats()
            seconds, tokens = run(llm, prompts, params)
            rates[name].append(tokens / seconds)
            report(name, seconds, tokens)
            print("   grammar work:", {k: round(v, 4) for k, v in masks.stats.as_dict().items()})
    free, bound = (statistics.median(rates[k]) for k in ("unconstrained", "constrained"))
    print(
        f"== medians: unconstrained {free:,.0f}, constrained {bound:,.0f} tok/s: {bound / free:.2f}x"
    )
    spy = shutil.which("py-spy")
    if spy is None:
        return
    path = os.path.join(args.out, "prof-structured.txt")
    cmd = [spy, "record", "--idle", "--rate", "250", "--format", "raw", "--duration", "4"]
    proc = subprocess.Popen([*cmd, "--output", path, "--pid", str(os.getpid())])
    time.sleep(0.5)
    report("constrained under py-spy", *run(llm, prompts, constrained))
    proc.wait()
    subprocess.run(["python3", "ci/prof_summary.py", path, "constrained"], check=False)


if __name__ == "__main__":
    main()
