"""Decode-step time at a fixed batch, for tensor-parallel speed-ups (ci/gpu_multi.sh): ``--batch``
requests of ``--context`` prompt tokens are prefilled, then ``--steps`` decode steps are timed
one by one (``engine.step()`` wall time, overlapped as the engine runs them).

    python ci/tp_decode_step.py --model llama-3-8b --tensor-parallel-size 2 --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hwlm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    llm = LLM(
        args.model,
        load_format="dummy",
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.batch,
        max_model_len=args.context + args.steps + 16,
    )
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    vocab = min(30000, engine.model_config.vocab_size)
    for i in range(args.batch):
        ids = torch.randint(5, vocab, (args.context,), generator=g).tolist()
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running
    ):
        engine.step()
    walls = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    median = statistics.median(walls)
    print(
        f"== {args.model} TP={args.tensor_parallel_size}, decode batch {args.batch}: "
        f"{1e3 * median:.2f} ms/step, {args.batch / median:,.0f} tok/s"
    )


if __name__ == "__main__":
    main()
