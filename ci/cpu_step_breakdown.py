"""Where a CPU decode step's time goes: per-op timers, and the step with the dense layers stubbed.

    python ci/cpu_step_breakdown.py --quantization int4 --kv-cache-dtype bfloat16

Runs ``--num-seqs`` prompts of 32 tokens through ``--tokens`` greedy decode steps of the
``c1-llama`` preset (dummy weights), twice: the first run warms up, the second is timed. Prints
milliseconds per step in each timed function (the engine step, the forward, every quantized or
packed dense layer (the LM head too), each backend op, sampling), then the same step with every dense layer
and the LM head replaced by a stub that returns zeros: what is left is the step's cost outside
the matmuls (attention, norms, rotary, KV writes, sampling, scheduling, inputs, Python).
The timers add about a microsecond per call; the stubbed run has none.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hwlm import LLM, SamplingParams
from hwlm.backends.cpu import CPUBackend
from hwlm.backends.cpu_linear import PackedLinear
from hwlm.backends.cpu_quant import OrtLinear
from hwlm.engine.llm_engine import LLMEngine
from hwlm.engine.model_runner import ModelRunner
from hwlm.models import CausalLM
from hwlm.models.layers import Linear
from hwlm.sampling.sampler import Sampler

TIMED: list[tuple[Any, str]] = [
    (LLMEngine, "step"),
    (ModelRunner, "prepare"),
    (ModelRunner, "_forward"),
    (Sampler, "sample"),
    (OrtLinear, "__call__"),
    (PackedLinear, "__call__"),
    (CPUBackend, "rms_norm"),
    (CPUBackend, "add_rms_norm"),
    (CPUBackend, "rotary"),
    (CPUBackend, "silu_and_mul"),
    (CPUBackend, "write_kv"),
    (CPUBackend, "attention"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantization", default=None, help="int8 or int4 (default: float32)")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--num-seqs", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    llm = LLM(
        "c1-llama",
        load_format="dummy",
        device="cpu",
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    prompts = [{"prompt_token_ids": list(range(100 + i, 132 + i))} for i in range(args.num_seqs)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)

    def per_step() -> float:
        """Milliseconds per decode step of the second of two runs."""
        llm.generate(prompts, params, use_tqdm=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return 1000 * (time.perf_counter() - start) / args.tokens

    totals: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    restore = [_timed(owner, name, totals, calls) for owner, name in TIMED]
    llm.generate(prompts, params, use_tqdm=False)
    totals.clear()
    calls.clear()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    step_ms = 1000 * (time.perf_counter() - start) / args.tokens
    for undo in restore:
        undo()
    print(f"{step_ms:.3f} ms per step ({args.num_seqs} sequences), with timers:")
    for label, seconds in totals.most_common():
        ms = 1000 * seconds / args.tokens
        print(f"  {label:32} {ms:7.3f} ms  {calls[label] / args.tokens:6.1f} calls per step")
    stubbed = statistics.median(_stubbed_steps(llm, per_step))
    print(f"{stubbed:.3f} ms per step with the dense layers and LM head stubbed out")


def _timed(
    owner: Any, name: str, totals: collections.Counter[str], calls: collections.Counter[str]
) -> Callable[[], None]:
    """Wrap ``owner.name`` with a timer; returns the undo."""
    original = owner.__dict__.get(name) or getattr(owner, name)
    label = f"{owner.__name__}.{name}"

    @functools.wraps(original)
    def timed(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            totals[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(owner, name, timed)
    return lambda: setattr(owner, name, original)


def _stubbed_steps(llm: LLM, per_step: Callable[[], float]) -> list[float]:
    """Three timings of the step with every dense layer and the LM head returning zeros."""
    model = llm.engine.runner.model
    assert isinstance(model, CausalLM)
    saved: list[tuple[Linear, Any]] = []
    for module in model.modules():
        if isinstance(module, Linear):
            width = sum(module.output_sizes)
            saved.append((module, module.kernel))
            module.kernel = functools.partial(_zeros, width=width)
    logits_kernel = model.logits_kernel
    model.logits_kernel = functools.partial(_zeros, width=model.config.vocab_size)
    try:
        return [per_step() for _ in range(3)]
    finally:
        for module, kernel in saved:
            module.kernel = kernel
        model.logits_kernel = logits_kernel


def _zeros(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.zeros(*x.shape[:-1], width)


if __name__ == "__main__":
    main()
