"""Where a decode step's time goes on a GPU: host work versus kernels.

    python ci/profile_decode.py --model llama-3-8b --batch 256 --context 384

Runs ``--batch`` requests of ``--context`` prompt tokens through prefill, then times decode steps
three ways: the whole ``engine.step()`` (wall), each phase with a device synchronisation after it
(input preparation, forward, logits, sampling, output processing), and the kernels of
one eager forward from torch.profiler (grouped: matmuls, attention, KV writes, the rest). It does
so for CUDA graphs with overlapped steps (wall time only: the phases overlap), CUDA graphs one
step at a time, and eager.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from hwlm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=384)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quantization", help="fp8 or int4 weights (default: as stored)")
    parser.add_argument("--modes", default="graphs-overlap,graphs,eager")
    args = parser.parse_args()
    modes = {"graphs-overlap": (False, True), "graphs": (False, False), "eager": (True, False)}
    for mode in args.modes.split(","):
        eager, overlap = modes[mode]
        profile(args, eager, overlap)


def profile(args: argparse.Namespace, eager: bool, overlap: bool) -> None:
    llm = LLM(
        args.model,
        load_format="dummy",
        device="cuda",
        max_num_seqs=args.batch,
        max_model_len=args.context + 4 * args.steps + 8,
        enforce_eager=eager,
        async_scheduling=overlap,
        quantization=args.quantization,
    )
    engine = llm.engine
    params = SamplingParams(temperature=1.0, max_tokens=3 * args.steps + 4, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        ids = torch.randint(0, 32000, (args.context,), generator=g).tolist()
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    while engine.scheduler.waiting or _prefilling(engine):  # prefill everything first
        engine.step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    phases = {} if overlap else _phase_times(engine, args.steps)
    label = ("eager" if eager else "CUDA graphs") + (", overlapped steps" if overlap else "")
    weights = args.quantization or "as stored"
    print(
        f"\n== {args.model} ({weights}), decode batch {args.batch}, context ~{args.context}, {label}"
    )
    print(f"engine.step() wall: median {1e3 * statistics.median(walls):.2f} ms")
    for name, values in phases.items():
        print(f"  {name:<28} {1e3 * statistics.median(values):8.2f} ms (synchronised)")
    if eager:
        _kernel_breakdown(engine)
    del llm, engine
    torch.cuda.empty_cache()


def _prefilling(engine) -> bool:  # noqa: ANN001
    return any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running)


def _phase_times(engine, steps: int) -> dict[str, list[float]]:  # noqa: ANN001
    """Per-phase times of ``steps`` engine steps, each phase wrapped with synchronisations."""
    runner = engine.runner
    times: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            return result

        return wrapper

    runner.prepare = timed("prepare inputs", runner.prepare)
    runner._forward = timed("forward", runner._forward)
    runner.model.compute_logits = timed("logits", runner.model.compute_logits)
    runner.sampler.sample = timed("sampling", runner.sampler.sample)
    engine._append_tokens = timed("append tokens, stop checks", engine._append_tokens)
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times["whole step (synchronised)"].append(time.perf_counter() - start)
    return times


def _kernel_breakdown(engine) -> None:  # noqa: ANN001
    runner = engine.runner
    inputs = runner.prepare(engine.scheduler.schedule())
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner._forward(inputs)
        torch.cuda.synchronize()
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.lower()
        if "attention_kernel" in name or "merge_splits" in name:
            group = "paged attention"
        elif "write_kv" in name:
            group = "write_kv"
        elif any(k in name for k in ("gemm", "gemv", "sm90", "cutlass", "nvjet", "scaled_mm")):
            group = "matmuls"
        else:
            group = "other (norms, rotary, activations, copies)"
        groups[group] += event.device_time_total / 1e3  # us -> ms
    total = sum(groups.values())
    print(f"  kernels of one eager forward: {total:.2f} ms of GPU time")
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"    {group:<44} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
