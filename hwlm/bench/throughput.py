"""`hwlm bench throughput`: offline throughput, optionally against transformers in the same run.

Weights are random; with ``--compare-hf`` transformers builds the model, saves it, and hwlm loads
that same folder, so both run identical weights on identical prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from hwlm.bench.hf_baselines import BaselineResult, make_prompts
from hwlm.bench.sampling_modes import add_sampling_argument, sampling_kwargs
from hwlm.bench.structured import add_structured_argument, load_schema
from hwlm.engine_args import add_cli_args, cli_kwargs

logger = logging.getLogger(__name__)

# The named workloads of docs/benchmarks.md (C1 on CPUs, G1-G3 on GPUs).
WORKLOADS: dict[str, dict[str, Any]] = {
    "c1": dict(
        model="c1-llama", num_prompts=32, input_len_min=32, input_len_max=256, output_len=64
    ),
    "g1": dict(
        model="llama-3-8b",
        num_prompts=1000,
        input_len_min=256,
        input_len_max=256,
        output_len=256,
        temperature=1.0,
    ),
    "g2": dict(
        model="qwen3-0.6b",
        num_prompts=256,
        input_len_min=100,
        input_len_max=1024,
        output_len_min=100,
        output_len=1024,
        temperature=0.6,
    ),
    "g3": dict(
        model="qwen2.5-0.5b",
        num_prompts=256,
        input_len_min=100,
        input_len_max=1024,
        output_len=256,
        hf_batch_size=64,
        hf_baselines="generate",
    ),
}


# Engine settings the workload decides unless given: (default, what it stands for).
ENGINE_DEFAULTS: dict[str, tuple[Any, str]] = {
    "max_model_len": (None, "the longest prompt plus --output-len, plus 1"),
    "load_format": (None, "dummy for a preset, else auto"),
    "tokenizer": (None, "the preset's own"),
}


@dataclass
class ThroughputResult:
    name: str
    seconds: float
    output_tokens_per_s: float
    requests_per_s: float
    # With --structured-json ("hwlm+json"): host time filling the grammar's masks, and
    # advancing the grammars over the sampled tokens.
    mask_fill_ms_per_step: float | None = None
    mask_fill_share: float | None = None  # of the run's wall time
    advance_ms_per_step: float | None = None
    advance_share: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), help="a named workload (sets the rest)"
    )
    parser.add_argument(
        "--model", default="c1-llama", help="preset name or model folder (default: c1-llama)"
    )
    parser.add_argument("--num-prompts", type=int, default=32, help="requests (default: 32)")
    parser.add_argument(
        "--input-len-min", type=int, default=32, help="shortest prompt, tokens (default: 32)"
    )
    parser.add_argument(
        "--input-len-max", type=int, default=256, help="longest prompt, tokens (default: 256)"
    )
    parser.add_argument(
        "--output-len", type=int, default=64, help="output tokens per request (the maximum)"
    )
    parser.add_argument(
        "--output-len-min",
        type=int,
        default=None,
        help="draw each request's output length uniformly from [this, --output-len] (seeded)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    add_sampling_argument(parser)
    add_structured_argument(parser)
    parser.add_argument(
        "--no-detokenize",
        dest="detokenize",
        action="store_false",
        help="token ids only, no text (SamplingParams.detokenize=False), to time detokenization",
    )
    parser.add_argument(
        "--compare-hf",
        action="store_true",
        help="also time transformers generate and generate_batch",
    )
    parser.add_argument(
        "--hf-baselines",
        default="generate,generate_batch",
        help="with --compare-hf: which transformers paths to time (comma-separated)",
    )
    parser.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="with --compare-hf: generate in padded batches of this many (default: one batch)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per engine; the median is reported"
    )
    parser.add_argument("--output-json", help="write the results here")
    add_cli_args(parser, ENGINE_DEFAULTS)


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
            preset = _check_hf_comparable(args, preset)
            from hwlm.bench.hf_baselines import build_hf_model

            hf_model = build_hf_model(preset, folder, seed=args.seed)
            model, load_format = folder, "auto"
        else:
            load_format = args.load_format or ("dummy" if preset is not None else "auto")
            model = args.model
        results.extend(_run_hwlm(args, model, load_format, prompts))
        if hf_model is not None:
            hf_model = _on_bench_device(hf_model, args.device, args.dtype)
            for baseline in _hf_baselines(args):
                runs = [baseline(hf_model, prompts, args.output_len) for _ in range(args.repeats)]
                logger.info(
                    "%s runs: %s s", runs[0].name, ", ".join(f"{r.seconds:.2f}" for r in runs)
                )
                median = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
                results.append(_from_baseline(median))
    _report(results, args)
    return results


def _check_hf_comparable(args: argparse.Namespace, preset: dict[str, Any] | None) -> dict[str, Any]:
    if preset is None:
        raise ValueError("--compare-hf needs a preset model name (its weights are built here)")
    if args.output_len_min is not None or args.temperature != 0.0:
        raise ValueError("--compare-hf needs fixed output lengths and greedy sampling")
    return preset


def _hf_baselines(args: argparse.Namespace) -> list[Callable[..., BaselineResult]]:
    from hwlm.bench.hf_baselines import run_hf_generate, run_hf_generate_batch

    known: dict[str, Callable[..., BaselineResult]] = {
        "generate": partial(run_hf_generate, batch_size=args.hf_batch_size),
        "generate_batch": run_hf_generate_batch,
    }
    names = [n.strip() for n in args.hf_baselines.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"--hf-baselines: unknown {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


def _on_bench_device(hf_model: Any, device: str, dtype: str) -> Any:
    """The transformers model on the GPU and in hwlm's dtype there (bf16 for "auto")."""
    import torch

    from hwlm.registry import select_backend

    if select_backend(device).name not in ("cuda", "rocm"):
        return hf_model
    want = torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)
    return hf_model.to(device="cuda", dtype=want)


def _output_lens(args: argparse.Namespace) -> list[int]:
    """Each request's output length: fixed, or uniform in [min, max] from a seeded draw."""
    if args.output_len_min is None:
        return [args.output_len] * args.num_prompts
    rng = np.random.default_rng(args.seed + 1)
    lens = rng.integers(args.output_len_min, args.output_len + 1, size=args.num_prompts)
    return [int(n) for n in lens]


def _prompts(args: argparse.Namespace, preset: dict[str, Any] | None) -> list[list[int]]:
    vocab = int(preset["vocab_size"]) if preset else 32000
    return make_prompts(args.num_prompts, args.input_len_min, args.input_len_max, vocab, args.seed)


def _run_hwlm(
    args: argparse.Namespace, model: str, load_format: str, prompts: list[list[int]]
) -> list[ThroughputResult]:
    """hwlm's run; with --structured-json, then the constrained run on the same engine."""
    from hwlm import LLM, SamplingParams
    from hwlm.presets.preset_tokenizers import tokenizer_path
    from hwlm.sampling.structured import MaskStats
    from hwlm.sampling_params import StructuredOutputsParams

    schema = load_schema(args.structured_json) if getattr(args, "structured_json", None) else None

    settings = cli_kwargs(args)
    settings["load_format"] = load_format
    settings["max_model_len"] = args.max_model_len or args.input_len_max + args.output_len + 1
    # The preset's own tokenizer: a folder built here (--compare-hf) has none.
    settings["tokenizer"] = args.tokenizer or str(tokenizer_path(args.model) or model)
    llm = LLM(model, **settings)
    params = [
        SamplingParams(
            **sampling_kwargs(args),
            max_tokens=n,
            ignore_eos=True,
            detokenize=getattr(args, "detokenize", True),
        )
        for n in _output_lens(args)
    ]
    warm_up = [
        {"prompt_token_ids": p}
        for p in warm_up_prompts(prompts, llm.engine.config.max_num_batched_tokens)
    ]
    llm.generate(warm_up, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    variants = {"hwlm": params}
    if schema is not None:
        structured = StructuredOutputsParams(json=schema)
        variants["hwlm+json"] = [
            dataclasses.replace(p, structured_outputs=structured) for p in params
        ]
        llm.generate(warm_up[:2], variants["hwlm+json"][:2], use_tqdm=False)  # the grammar
    masks = llm.engine.runner.sampler.masks
    masks.stats = MaskStats()
    results = _timed_runs(llm, variants, prompts, args.repeats)
    if schema is not None:
        result = results[-1]
        stats = masks.stats.as_dict()
        result.mask_fill_ms_per_step = stats["mask_fill_ms_per_step"]
        result.mask_fill_share = masks.stats.seconds / args.repeats / result.seconds
        result.advance_ms_per_step = stats["advance_ms_per_step"]
        result.advance_share = masks.stats.advance_seconds / args.repeats / result.seconds
    return results


def warm_up_prompts(prompts: list[list[int]], token_budget: int) -> list[list[int]]:
    """The first prompts, at least two, up to one step's worth of tokens: the warm-up prefills
    them together in the largest step the timed runs will take, which compiles the kernels for
    prefill and decode shapes and grows the memory pools (the allocator's, ONNX Runtime's
    arena, oneDNN's scratch) to that size. Otherwise the first timed run pays for the growth:
    on the 2-core CPU, C1's first 4,803-token step took 5.4 s against 1.5 s once grown."""
    total = 0
    for count, prompt in enumerate(prompts, start=1):
        total += len(prompt)
        if count >= 2 and total >= token_budget:
            return prompts[:count]
    return prompts


def _timed_runs(
    llm: Any, variants: dict[str, list[Any]], prompts: list[list[int]], repeats: int
) -> list[ThroughputResult]:
    """Each variant's median run; the variants take turns, so a machine's drift in speed
    affects them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, params in variants.items():
            llm.reset_prefix_cache()  # each run starts cold: no prompt is served from before
            start = time.perf_counter()
            outputs = llm.generate(
                [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
            )
            times[name].append(time.perf_counter() - start)
            tokens[name] = sum(len(o.outputs[0].token_ids) for o in outputs)
    results = []
    for name, runs in times.items():
        logger.info("%s runs: %s s", name, ", ".join(f"{t:.2f}" for t in runs))
        seconds = statistics.median_high(runs)  # a run that happened, as for the baselines
        results.append(
            ThroughputResult(name, seconds, tokens[name] / seconds, len(prompts) / seconds)
        )
    return results


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
    ours = [r for r in results if r.name.startswith("hwlm")]
    baselines = [r for r in results if not r.name.startswith("hwlm")]
    if baselines:
        best = max(baselines, key=lambda r: r.output_tokens_per_s)
        lines.append(
            f"hwlm / best transformers baseline ({best.name}): {results[0].output_tokens_per_s / best.output_tokens_per_s:.2f}x"
        )
    for r in ours[1:]:
        lines.append(
            f"{r.name} / hwlm: {r.output_tokens_per_s / ours[0].output_tokens_per_s:.2f}x; "
            f"masks: {r.mask_fill_ms_per_step:.2f} ms of host time per step "
            f"({100 * (r.mask_fill_share or 0.0):.1f}% of the run), grammar advance "
            f"{r.advance_ms_per_step or 0.0:.2f} ms ({100 * (r.advance_share or 0.0):.1f}%)"
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
