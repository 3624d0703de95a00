"""The `hwlm` command line."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_MODEL = "hwlm-tiny"


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, rocm, a plugin name, or auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True
    )
    parser.add_argument("--memory-utilization", "--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument(
        "--load-format", default="auto", choices=["auto", "safetensors", "pt", "dummy"]
    )
    parser.add_argument("--tokenizer", default=None)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        memory_utilization=args.memory_utilization,
        num_kv_blocks=args.num_kv_blocks,
        load_format=args.load_format,
        tokenizer=args.tokenizer,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwlm", description="Serve and run LLMs on any hardware.")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    devices = sub.add_parser("devices", help="list the known backends and whether each is usable")
    devices.add_argument(
        "--check", action="store_true", help="also run a tiny smoke test on each usable backend"
    )
    devices.set_defaults(func=_devices)

    gen = sub.add_parser("generate", help="generate text for one prompt and print it")
    gen.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    _add_engine_arguments(gen)
    gen.set_defaults(func=_generate)

    from hwlm.server.cli import add_serve_parser

    add_serve_parser(sub, _add_engine_arguments, _engine_kwargs)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    throughput = bench_sub.add_parser(
        "throughput", help="offline throughput (like vllm bench throughput)"
    )
    from hwlm.bench import throughput as throughput_module

    throughput_module.add_arguments(throughput)
    throughput.set_defaults(func=lambda a: throughput_module.run(a))
    serve_bench = bench_sub.add_parser(
        "serve", help="load-test a running server: TTFT, inter-token latency, tok/s"
    )
    from hwlm.bench import serve as serve_bench_module

    serve_bench_module.add_arguments(serve_bench)
    serve_bench.set_defaults(func=lambda a: serve_bench_module.run(a))
    return parser


def _devices(args: argparse.Namespace) -> int:
    from hwlm.registry import describe_backends

    print(f"{'device':<24}{'available':<11}{'score':>6}  reason")
    failed = False
    for info in describe_backends():
        state = "yes" if info.probe.available else "no"
        print(f"{info.name:<24}{state:<11}{info.probe.score:>6}  {info.probe.reason}")
        if args.check and info.probe.available and info.backend_class is not None:
            from hwlm.smoke import smoke_test

            ok, detail = smoke_test(info.backend_class)
            failed |= not ok
            print(f"{'':<24}{'PASS' if ok else 'FAIL'}: {detail}")
    return 1 if failed else 0


def _generate(args: argparse.Namespace) -> int:
    from hwlm import LLM, SamplingParams

    load_format = args.load_format
    llm = LLM(args.model, **{**_engine_kwargs(args), "load_format": load_format})
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens
    )
    out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(args.prompt + out.outputs[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        result = args.func(args)
    except ValueError as exc:
        print(f"hwlm: error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
