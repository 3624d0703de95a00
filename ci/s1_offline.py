"""S1's offline reference: the prompts `hwlm bench serve` sends (same seed and length), through
LLM.generate with the server's settings, output tokens per second (median of three runs).

    python ci/s1_offline.py --model c1-llama --num-prompts 200 --input-len 64 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from hwlm import LLM, SamplingParams
from hwlm.bench.serve import random_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="c1-llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="as hwlm bench serve's --seed")
    parser.add_argument("--output-json", default=None, help="write the figures here")
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", device=args.device, max_model_len=args.max_model_len)
    prompts = random_prompts(args.num_prompts, args.input_len, seed=args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)
    times = []
    for _ in range(3):
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    seconds = statistics.median(times)
    print(f"offline: {prompt_tokens} prompt tokens, {tokens} output tokens")
    print(f"runs {', '.join(f'{t:.2f}' for t in times)} s; median {seconds:.2f} s")
    print(f"output tok/s {tokens / seconds:.1f}")
    if args.output_json:
        figures = {"output_throughput": tokens / seconds, "duration": seconds, "runs": times}
        figures.update(total_input_tokens=prompt_tokens, total_output_tokens=tokens)
        with open(args.output_json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
