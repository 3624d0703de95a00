"""Where a constrained step's host time goes: llguidance mask fills and token advances for a
batch of JSON-schema matchers (a built-in schema of `hwlm bench throughput --structured-json`)
with a preset's tokenizer, on this machine's CPU (no model, no device).

    python ci/structured_mask_bench.py --model qwen2.5-0.5b --batch 256 --steps 64
    python ci/structured_mask_bench.py --schema builtin-bounded --threads 0

For each executor thread count: mean milliseconds per step to fill the batch's masks, to advance
every matcher by one token with the executor's parallel consume, and with the engine's own
advance (``advance_grammars``, which uses the process's executor). Last, one-by-one
``consume_token`` calls per step, the engine's way before the batched advance."""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import numpy as np
import torch

from hwlm.bench.structured import BUILTIN_SCHEMAS
from hwlm.engine.sequence import Sequence
from hwlm.presets.preset_tokenizers import tokenizer_path
from hwlm.sampling.structured.advance import advance_grammars
from hwlm.sampling.structured.library import llguidance
from hwlm.sampling.structured.manager import StructuredOutputs
from hwlm.sampling_params import SamplingParams, StructuredOutputsParams
from hwlm.text.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--vocab-size", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="*", default=[0, 1, 4, 8, 16])
    parser.add_argument("--schema", choices=sorted(BUILTIN_SCHEMAS), default="builtin")
    parser.add_argument(
        "--plain-strings",
        action="store_true",
        help="drop maxLength, pattern and format from the schema's strings",
    )
    args = parser.parse_args()
    tokenizer = load_tokenizer(str(tokenizer_path(args.model)))
    structured = StructuredOutputs(tokenizer, args.vocab_size, (tokenizer.eos_token_id or 0,))
    schema = BUILTIN_SCHEMAS[args.schema]
    if args.plain_strings:
        schema = _plain(schema)  # type: ignore[assignment]
    params = StructuredOutputsParams(json=schema)
    print(f"cpus {os.cpu_count()}, batch {args.batch}, vocab {args.vocab_size}, {args.schema}")
    words = torch.empty(args.batch, (args.vocab_size + 31) // 32, dtype=torch.int32)
    for threads in args.threads:
        executor = llguidance().LLExecutor(threads or None)
        fill, consume = _run(executor, structured, params, words, args.steps, "parallel")
        _, advance = _run(executor, structured, params, words, args.steps, "engine")
        print(
            f"threads {threads or 'default'}: fill {fill:.2f} ms/step, parallel consume "
            f"{consume:.2f} ms/step, engine advance {advance:.2f} ms/step"
        )
    _, serial = _run(executor, structured, params, words, args.steps, "one-by-one")
    print(f"one-by-one consume_token: {serial:.2f} ms/step")


def _run(
    executor: Any,
    structured: StructuredOutputs,
    params: StructuredOutputsParams,
    words: torch.Tensor,
    steps: int,
    advance: str,
) -> tuple[float, float]:
    """Mean ms per step filling the masks, and advancing the matchers over a random allowed
    token each: ``advance`` "parallel" (``executor.consume_token_par``), "engine" (the engine's
    ``advance_grammars`` on sequences) or "one-by-one" (``consume_token`` per matcher)."""
    rng = random.Random(0)
    batch = words.shape[0]
    seqs = [Sequence(k, str(k), [0], SamplingParams()) for k in range(batch)]
    for seq in seqs:
        seq.grammar = structured.new_state(params)
    matchers = [s.grammar.matcher for s in seqs]  # type: ignore[union-attr]
    fill = consume = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        pairs = [(m, k) for k, m in enumerate(matchers)]
        executor.unsafe_compute_mask_ptr(pairs, words.data_ptr(), words.shape[1] * 4, batch)
        fill += time.perf_counter() - start
        tokens = [_random_allowed(words[k].numpy(), rng) for k in range(batch)]
        start = time.perf_counter()
        if advance == "engine":
            for seq, token in zip(seqs, tokens, strict=True):
                seq.token_ids.append(token)
            advance_grammars(seqs)
        elif advance == "parallel":
            executor.consume_token_par(list(zip(matchers, tokens, strict=True)))
        else:
            for matcher, token in zip(matchers, tokens, strict=True):
                matcher.consume_token(token)
        consume += time.perf_counter() - start
    return 1e3 * fill / steps, 1e3 * consume / steps


def _plain(node: object) -> object:
    """The schema without string bounds (maxLength, pattern, format)."""
    if isinstance(node, dict):
        drop = {"maxLength", "pattern", "format"} if node.get("type") == "string" else set()
        return {k: _plain(v) for k, v in node.items() if k not in drop}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _random_allowed(mask_words: np.ndarray, rng: random.Random) -> int:
    bits = np.unpackbits(mask_words.view(np.uint8), bitorder="little")
    allowed = np.flatnonzero(bits)
    return int(allowed[rng.randrange(len(allowed))]) if len(allowed) else 0


if __name__ == "__main__":
    main()
