"""Where a whole benchmark workload's time goes: steps with prefill tokens, decode-only steps,
and what ``LLM.generate`` does around the steps.

    python ci/profile_workload.py --workload g3 --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from hwlm import LLM, SamplingParams
from hwlm.bench.throughput import WORKLOADS, _output_lens, _prompts
from hwlm.presets import TOKENIZER_DIR, get_preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="g3", choices=sorted(WORKLOADS))
    parser.add_argument("--device", default="cuda")
    cli = parser.parse_args()
    args = argparse.Namespace(
        **{"seed": 0, "output_len_min": None, "temperature": 0.0, **WORKLOADS[cli.workload]}
    )
    prompts = _prompts(args, get_preset(args.model))
    llm = LLM(
        args.model,
        load_format="dummy",
        device=cli.device,
        max_model_len=args.input_len_max + args.output_len + 1,
        tokenizer=str(TOKENIZER_DIR),
    )
    params = [
        SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True)
        for n in _output_lens(args)
    ]
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params[:2], use_tqdm=False)
    engine, runner = llm.engine, llm.engine.runner
    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    execute = runner.execute

    def timed_execute(batch):  # noqa: ANN001, ANN202
        kind = "decode-only" if max(batch.num_new_tokens) == 1 else "with prefill"
        if kind == "with prefill" and stats[kind][0] == 3:
            stats[kind][0] += 1  # counted, not timed
            return _traced(execute, batch)
        start = time.perf_counter()
        result = execute(batch)
        entry = stats[kind]
        entry[0] += 1
        entry[1] += time.perf_counter() - start
        entry[2] += sum(batch.num_new_tokens)
        return result

    runner.execute = timed_execute
    step = engine.step

    def timed_step():  # noqa: ANN202
        start = time.perf_counter()
        out = step()
        stats["engine.step total"][1] += time.perf_counter() - start
        stats["engine.step total"][0] += 1
        return out

    engine.step = timed_step
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    print(f"{cli.workload}: LLM.generate {wall:.2f} s")
    for kind, (count, seconds, tokens) in stats.items():
        per = 1e3 * seconds / max(count, 1)
        print(
            f"  {kind:<20} {count:5d} steps {seconds:7.2f} s ({per:.2f} ms/step, {tokens} tokens)"
        )


def _traced(execute, batch):  # noqa: ANN001, ANN202
    """Run one step under torch.profiler and print its costliest kernels and host calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = execute(batch)
        torch.cuda.synchronize()
    n = sum(batch.num_new_tokens)
    print(f"-- one step with prefill: {len(batch.seqs)} sequences, {n} tokens")
    print(
        prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50
        )
    )
    print(
        prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50
        )
    )
    return result


if __name__ == "__main__":
    main()
