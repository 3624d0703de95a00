"""The engine core's host time per step early and late in long outputs.

Runs ``EngineCore`` (what the engine process runs) on NUM_SEQS streamed requests of OUTPUT_LEN
tokens each, with a stop string that never matches (so every step detokenizes and checks stop
strings, as a request with stop strings does), and times every ``process()`` call less the time
spent in the model runner's launch and in waiting for the sampled tokens: what is left is the
host's bookkeeping (scheduling, appending tokens, detokenizing, stop checks, deltas, stats) plus
msgpack encoding of the messages. Prints the median at output positions around 100 and around
4,000, and their ratio (it should stay near 1: nothing per step may grow with an output's length).

    python ci/step_host_time.py --device cpu                      # hwlm-tiny
    python ci/step_host_time.py --device cuda --model qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Any

import msgspec

from hwlm.engine.core import EngineCore
from hwlm.engine.messages import AddRequest, SamplingOptions
from hwlm.engine_args import EngineArgs
from hwlm.sampling.sampler import SampledBatch
from hwlm.sampling_params import SamplingParams

WINDOWS = ((90, 110), (3990, 4010))


class DeviceTimer:
    """Accumulates the time spent in the runner's launch and in reading sampled tokens back."""

    def __init__(self, core: EngineCore) -> None:
        self.elapsed = 0.0
        runner = core.engine.runner
        launch = runner.launch
        to_output = SampledBatch.to_output

        def timed_launch(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return launch(*args, **kwargs)
            finally:
                self.elapsed += time.perf_counter() - start

        def timed_to_output(batch: SampledBatch) -> Any:
            start = time.perf_counter()
            try:
                return to_output(batch)
            finally:
                self.elapsed += time.perf_counter() - start

        runner.launch = timed_launch  # type: ignore[method-assign]
        SampledBatch.to_output = timed_to_output  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hwlm-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-seqs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=4100)
    parser.add_argument(
        "--no-stop", dest="stop", action="store_false", help="no stop string (no detokenizing)"
    )
    parser.add_argument("--output-json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HWLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # hwlm-tiny has 2,048 positions
    engine_args = EngineArgs(
        model=args.model,
        device=args.device,
        load_format="dummy",
        max_model_len=args.prompt_len + args.output_len + 8,
    )
    core = EngineCore.from_args(engine_args)
    timer = DeviceTimer(core)
    params = SamplingParams(
        temperature=0,
        max_tokens=args.output_len,
        ignore_eos=True,
        stop=["\x00never-in-the-output\x00"] if args.stop else None,
    )
    inputs: list[Any] = [
        AddRequest(
            f"r{i}",
            [(7 * i + j) % 200 + 10 for j in range(args.prompt_len)],
            SamplingOptions.from_params(params),
            True,
            time.monotonic(),
        )
        for i in range(args.num_seqs)
    ]
    encoder = msgspec.msgpack.Encoder()
    samples: dict[int, list[float]] = {}
    while inputs or core.has_work():
        device_before = timer.elapsed
        start = time.perf_counter()
        messages = core.process(inputs)
        for message in messages:
            encoder.encode(message)
        host = time.perf_counter() - start - (timer.elapsed - device_before)
        inputs = []
        running = core.engine.scheduler.running
        if running:
            samples.setdefault(running[0].num_output_tokens, []).append(host)
    result = {}
    for low, high in WINDOWS:
        times = [t for pos in range(low, high + 1) for t in samples.get(pos, [])]
        result[f"{low}-{high}"] = statistics.median(times) * 1e6 if times else None
    early, late = (result[f"{lo}-{hi}"] for lo, hi in WINDOWS)
    ratio = late / early if early and late else None
    print(
        f"host time per step, {args.num_seqs} streamed sequences with a stop string "
        f"({args.model}, {args.device}): output position ~100: {early:.0f} us, ~4,000: "
        f"{late:.0f} us, ratio {ratio:.2f}"
        if ratio
        else f"not enough steps: {result}"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**result, "ratio": ratio, **vars(args)}, f)


if __name__ == "__main__":
    main()
