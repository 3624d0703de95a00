"""The `hwlm` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from typing import Any

from hwlm.engine_args import add_cli_args, cli_kwargs

DEFAULT_MODEL = "hwlm-tiny"


LOG_LEVELS = ["debug", "info", "warning", "error"]


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` after the subcommand too (``hwlm serve --log-level debug``), as vLLM
    takes it; left unset, the top-level value stands."""
    if "--log-level" not in parser._option_string_actions:
        parser.add_argument(
            "--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help="logging level"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwlm", description="Serve and run LLMs on any hardware.")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="logging level; also accepted after the subcommand (default: info)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    devices = sub.add_parser("devices", help="list the known backends and whether each is usable")
    devices.add_argument(
        "--check", action="store_true", help="also run a tiny smoke test on each usable backend"
    )
    devices.set_defaults(func=_devices)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    gen.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help="folder, hub id or preset (hwlm-tiny)"
    )
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--max-tokens", type=int, default=64, help="(default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="0 disables it (default: 0)")
    add_cli_args(gen)
    gen.set_defaults(func=_generate)

    from hwlm.cli.chat import add_chat_parser
    from hwlm.cli.serve import add_serve_parser

    add_serve_parser(sub)
    add_chat_parser(sub, add_cli_args, cli_kwargs)
    for subparser in sub.choices.values():
        _add_log_level(subparser)

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
    standin = bench_sub.add_parser(
        "standin", help="a stand-in OpenAI server: the load generator's ceiling"
    )
    from hwlm.bench import standin as standin_module

    standin_module.add_arguments(standin)
    standin.set_defaults(func=lambda a: standin_module.run(a))
    return parser


def _devices(args: argparse.Namespace) -> int:
    from hwlm.registry import describe_backends

    print(f"{'device':<24}{'available':<11}{'score':>6}  reason")
    failed = False
    for info in describe_backends():
        state = "yes" if info.probe.available else "no"
        print(f"{info.name:<24}{state:<11}{info.probe.score:>6}  {info.probe.reason}")
        if args.check and info.probe.available and info.backend_class is not None:
            from hwlm.cli.smoke import smoke_test

            ok, detail = smoke_test(info.backend_class)
            failed |= not ok
            print(f"{'':<24}{'PASS' if ok else 'FAIL'}: {detail}")
    return 1 if failed else 0


def _generate(args: argparse.Namespace) -> int:
    from hwlm import LLM, SamplingParams

    llm = LLM(args.model, **cli_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens
    )
    print(args.prompt, end="", flush=True)
    sent = ""
    for text in _stream_text(llm.engine, args.prompt, params):
        print(text[len(sent) :] if text.startswith(sent) else text, end="", flush=True)
        sent = text
    print()
    return 0


def _stream_text(engine: Any, prompt: str, params: Any) -> Iterator[str]:
    """The completion's text after each step (cumulative), ending with the final text."""
    engine.add_request("generate-0", prompt, params, stream=True)
    while engine.has_unfinished_requests():
        for output in engine.step():
            yield output.outputs[0].text


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
