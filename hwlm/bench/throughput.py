"""`hwlm bench throughput`: offline throughput, optionally against transformers in the same run.

Weights are random; with ``--compare-hf`` transformers builds the model, saves it, and hwlm loads
that same folder, so both run identical weights on identical prompts.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

from hwlm.bench.hf_baselines import BaselineResult, make_prompts

logger = logging.getLogger(__name__)

# Named workloads of shared/benchmarks.md.
WORKLOADS: dict[str, dict] = {
    "c1": dict(
        model="c1-llama", num_prompts=32, input_len_min=32, input_len_max=256, output_len=64
    ),
}


@dataclass
class ThroughputResult:
    name: str
    seconds: float
    output_tokens_per_s: float
    requests_per_s: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), help="a named workload (sets the rest)"
    )
    parser.add_argument("--model", default="c1-llama", help="preset name or model folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len-min", type=int, default=32)
    parser.add_argument("--input-len-max", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument(
        "--compare-hf",
        action="store_true",
        help="also time transformers generate and generate_batch",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per engine; the median is reported"
    )
    parser.add_argument("--output-json", help="write the results here")


def run(args: argparse.Namespace) -> list[ThroughputResult]:
    if args.workload:
        for key, value in WORKLOADS[args.workload].items():
            setattr(args, key, value)
    from hwlm.presets import get_preset

    preset = get_preset(args.model)
    prompts = _prompts(args, preset)
    results: list[ThroughputResult] = []
    with tempfile.TemporaryDirectory(prefix="hwlm-bench-") as folder:
        hf_model = None
        if args.compare_hf:
            if preset is None:
                raise ValueError(
                    "--compare-hf needs a preset model name (its weights are built here)"
                )
            from hwlm.bench.hf_baselines import build_hf_model

            hf_model = build_hf_model(preset, folder, seed=args.seed)
            model, load_format = folder, "auto"
        else:
            model, load_format = args.model, ("dummy" if preset is not None else "auto")
        results.append(_run_hwlm(args, model, load_format, prompts))
        if hf_model is not None:
            from hwlm.bench.hf_baselines import run_hf_generate, run_hf_generate_batch

            for baseline in (run_hf_generate, run_hf_generate_batch):
                runs = [baseline(hf_model, prompts, args.output_len) for _ in range(args.repeats)]
                logger.info(
                    "%s runs: %s s", runs[0].name, ", ".join(f"{r.seconds:.2f}" for r in runs)
                )
                median = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
                results.append(_from_baseline(median))
    _report(results, args)
    return results


def _prompts(args: argparse.Namespace, preset: dict | None) -> list[list[int]]:
    vocab = int(preset["vocab_size"]) if preset else 32000
    return make_prompts(args.num_prompts, args.input_len_min, args.input_len_max, vocab, args.seed)


def _run_hwlm(
    args: argparse.Namespace, model: str, load_format: str, prompts: list[list[int]]
) -> ThroughputResult:
    from hwlm import LLM, SamplingParams
    from hwlm.presets import TOKENIZER_DIR

    llm = LLM(
        model,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        load_format=load_format,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.input_len_max + args.output_len + 1,
        tokenizer=str(TOKENIZER_DIR),  # prompts are token ids; a folder built here has none
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm_up = [{"prompt_token_ids": p[:8]} for p in prompts[:2]]
    llm.generate(warm_up, params, use_tqdm=False)
    times = []
    for _ in range(args.repeats):
        llm.reset_prefix_cache()  # each run starts cold: no prompt is served from a previous run
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    logger.info("hwlm runs: %s s", ", ".join(f"{t:.2f}" for t in times))
    seconds = statistics.median(times)
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return ThroughputResult("hwlm", seconds, num_tokens / seconds, len(prompts) / seconds)


def _from_baseline(result: BaselineResult) -> ThroughputResult:
    return ThroughputResult(
        result.name, result.seconds, result.output_tokens_per_s, result.requests_per_s
    )


def _report(results: list[ThroughputResult], args: argparse.Namespace) -> None:
    lines = [f"{'engine':<28}{'seconds':>10}{'output tok/s':>15}{'req/s':>10}"]
    for r in results:
        lines.append(
            f"{r.name:<28}{r.seconds:>10.2f}{r.output_tokens_per_s:>15.1f}{r.requests_per_s:>10.3f}"
        )
    if len(results) > 1:
        best = max(results[1:], key=lambda r: r.output_tokens_per_s)
        lines.append(
            f"hwlm / best transformers baseline ({best.name}): {results[0].output_tokens_per_s / best.output_tokens_per_s:.2f}x"
        )
    print("\n".join(lines))
    if args.output_json:
        with open(args.output_json, "w") as f:
            settings = {
                k: v
                for k, v in vars(args).items()
                if isinstance(v, str | int | float | bool | None)
            }
            json.dump({"args": settings, "results": [asdict(r) for r in results]}, f, indent=2)
