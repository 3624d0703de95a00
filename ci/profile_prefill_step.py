"""What an eager (prefill or mixed) step costs the host, against a decode step replayed from a
CUDA graph: ``LLM.generate`` steps of the G3 model timed one by one, then torch.profiler's top
host operators over a few mixed steps (one new 64-token prompt joining running decodes, as when
a request arrives at a busy server).

    python ci/profile_prefill_step.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from hwlm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="qwen2.5-0.5b")
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", device=args.device, max_model_len=1024)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    rng = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size

    def prompt() -> dict[str, list[int]]:
        return {
            "prompt_token_ids": torch.randint(5, min(30000, vocab), (64,), generator=rng).tolist()
        }

    for i in range(8):  # running decodes
        engine.add_request(f"bg{i}", prompt()["prompt_token_ids"], params)
    for _ in range(20):
        engine.step()
    timings: dict[str, list[float]] = {"mixed (1 new prompt + decodes)": [], "decode only": []}
    for k in range(12):
        engine.add_request(f"new{k}", prompt()["prompt_token_ids"], params)
        for name in timings:
            engine.backend.synchronize()
            start = time.perf_counter()
            engine.step()
            engine.backend.synchronize()
            timings[name].append(1e3 * (time.perf_counter() - start))
    for name, values in timings.items():
        values.sort()
        print(f"{name}: median {values[len(values) // 2]:.2f} ms, min {values[0]:.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(4):
            engine.add_request(f"prof{k}", prompt()["prompt_token_ids"], params)
            engine.step()
        engine.backend.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
