"""Where a whole benchmark workload's time goes, run after run.

    python ci/profile_workload.py --workload g3 --device cuda

For overlapped steps (``async_scheduling``) on and off, runs the workload ``--runs`` times on one
engine (prefix cache reset between runs) and prints per run: the wall time, output tok/s, the
number of steps with prefill tokens and decode-only steps, and how many Triton kernels were
compiled during the run (a first run that compiles kernels the warm-ups missed is slower).
"""

from __future__ import annotations

import argparse
import time

from hwlm import LLM, SamplingParams
from hwlm.bench.throughput import WORKLOADS, _output_lens, _prompts
from hwlm.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="g3", choices=sorted(WORKLOADS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=3)
    cli = parser.parse_args()
    args = argparse.Namespace(
        **{"seed": 0, "output_len_min": None, "temperature": 0.0, **WORKLOADS[cli.workload]}
    )
    prompts = [{"prompt_token_ids": p} for p in _prompts(args, get_preset(args.model))]
    params = [
        SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True)
        for n in _output_lens(args)
    ]
    compiles = _count_triton_compiles()
    for overlap in (True, False):
        llm = LLM(
            args.model,
            load_format="dummy",
            device=cli.device,
            max_model_len=args.input_len_max + args.output_len + 1,
            async_scheduling=overlap,
        )
        label = "overlapped steps" if overlap else "one step at a time"
        print(f"== {cli.workload}, {label} (Triton compiles at start-up: {compiles[0]})")
        for run in range(cli.runs):
            llm.reset_prefix_cache()
            steps = _count_steps(llm)
            compiles[0] = 0
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            print(
                f"  run {run + 1}: {wall:6.2f} s, {tokens / wall:9.1f} out tok/s, "
                f"{steps['prefill']} steps with prefill, {steps['decode']} decode-only, "
                f"{compiles[0]} Triton compiles"
            )
        if not overlap:
            _step_breakdown(llm, prompts, params)
        del llm


def _step_breakdown(llm: LLM, prompts: list, params: list) -> None:  # type: ignore[type-arg]
    """One more run, timing every engine.step() (one step at a time, so a step's wall time is
    its own) and grouping the steps: with prefill tokens, and decode-only by batch size."""
    engine, runner = llm.engine, llm.engine.runner
    launch, step = runner.launch, engine.step
    current: list[tuple[str, int, int]] = []
    groups: dict[str, list[float]] = {}

    def recorded(batch):  # noqa: ANN001, ANN202
        prefill = max(batch.num_new_tokens) > 1
        current.append(("prefill" if prefill else "decode", len(batch.seqs), batch.total_tokens))
        return launch(batch)

    def timed():  # noqa: ANN202
        start = time.perf_counter()
        out = step()
        elapsed = time.perf_counter() - start
        if current:
            kind, seqs, tokens = current.pop()
            key = "with prefill" if kind == "prefill" else f"decode, {_bucket(seqs)} seqs"
            entry = groups.setdefault(key, [0, 0.0, 0])
            entry[0] += 1
            entry[1] += elapsed
            entry[2] += tokens
        return out

    runner.launch = recorded  # type: ignore[method-assign]
    engine.step = timed  # type: ignore[method-assign]
    llm.reset_prefix_cache()
    llm.generate(prompts, params, use_tqdm=False)
    runner.launch, engine.step = launch, step  # type: ignore[method-assign]
    print("  steps of one more run, one step at a time:")
    for key, (count, seconds, tokens) in sorted(groups.items()):
        print(
            f"    {key:<22} {count:5d} steps {seconds:7.2f} s "
            f"({1e3 * seconds / count:6.2f} ms/step, {tokens} tokens)"
        )


def _bucket(n: int) -> str:
    for low, high in ((1, 16), (17, 64), (65, 128), (129, 192), (193, 256)):
        if n <= high:
            return f"{low:3d}-{high:3d}"
    return f"{n:3d}+"


def _count_triton_compiles() -> list[int]:
    """A one-element counter that every Triton JIT compilation increments."""
    import triton

    counter = [0]

    def hook(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        counter[0] += 1

    triton.knobs.runtime.jit_post_compile_hook = hook
    return counter


def _count_steps(llm: LLM) -> dict[str, int]:
    counts = {"prefill": 0, "decode": 0}
    runner = llm.engine.runner
    launch = runner.__class__.launch

    def counted(batch):  # noqa: ANN001, ANN202
        counts["decode" if max(batch.num_new_tokens) == 1 else "prefill"] += 1
        return launch(runner, batch)

    runner.launch = counted  # type: ignore[method-assign]
    return counts


if __name__ == "__main__":
    main()
