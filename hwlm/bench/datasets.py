"""The requests ``hwlm bench serve`` sends: random words (``words``) or, as ``vllm bench serve
--dataset-name random`` does, token-id prompts of exact lengths (``random``).

A ``random`` prompt set is the one ``hwlm bench throughput`` draws for the same lengths and seed
(``hf_baselines.make_prompts``), so offline and served figures can run the same token ids.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORDS = (
    "the of and to in is was for on that with as by at from his her an be this are have not but "
    "had were which their one all there been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under"
).split()


@dataclass(frozen=True)
class BenchRequest:
    """One request to send. ``prompt_len`` is known for token-id prompts (None for text, whose
    length the server's usage reports)."""

    index: int
    prompt: str | list[int]
    output_len: int
    prompt_len: int | None = None
    abort_after: int | None = None  # abandon the stream after this many content chunks


def random_prompts(num: int, input_len: int, seed: int) -> list[str]:
    """``num`` prompts of ``input_len`` words each, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=input_len)) for _ in range(num)]


def length_range(length: int, ratio: float, minimum: int = 1) -> tuple[int, int]:
    """vLLM's random-dataset bounds: [floor(length (1 - ratio)), ceil(length (1 + ratio))],
    at least ``minimum``."""
    low = max(math.floor(length * (1 - ratio)), minimum)
    return low, max(math.ceil(length * (1 + ratio)), low)


def random_token_prompts(
    num: int, input_range: tuple[int, int], vocab_size: int, seed: int
) -> list[list[int]]:
    """Token-id prompts, lengths uniform in ``input_range`` (inclusive), ids in [0, vocab_size):
    ``hwlm bench throughput``'s prompts for the same arguments."""
    from hwlm.bench.hf_baselines import make_prompts

    return make_prompts(num, input_range[0], input_range[1], vocab_size, seed)


def output_lengths(num: int, output_range: tuple[int, int], seed: int) -> list[int]:
    """Each request's max_tokens: uniform in ``output_range`` (inclusive) from
    ``numpy.random.default_rng(seed + 1)``, as ``hwlm bench throughput --output-len-min`` draws."""
    low, high = output_range
    if low == high:
        return [low] * num
    rng = np.random.default_rng(seed + 1)
    return [int(n) for n in rng.integers(low, high + 1, size=num)]


def abort_plan(num: int, fraction: float, output_len: int, seed: int) -> dict[int, int]:
    """Which requests to abandon, and after how many content chunks: at least one, so that the
    abort happens mid-stream, and early in the stream, since a busy server may send several
    tokens in one chunk (a request whose stream ends first completes instead)."""
    rng = random.Random(seed + 1)
    chosen = rng.sample(range(num), round(num * fraction))
    return {i: rng.randint(1, max(1, output_len // 4)) for i in chosen}


def vocab_size_of(model: str, tokenizer: str | None) -> int:
    """The vocabulary random token ids are drawn from: a preset's or a local model folder's
    ``vocab_size``, else the tokenizer's (``tokenizer``, else the model's). ValueError when
    none can be read."""
    from hwlm.presets import get_preset

    for name in (tokenizer, model):
        if name is None:
            continue
        config = get_preset(name)
        if config is None and (Path(name).expanduser() / "config.json").is_file():
            config = json.loads((Path(name).expanduser() / "config.json").read_text())
        if config is not None and "vocab_size" in config:
            return int(config["vocab_size"])
    return int(load_bench_tokenizer(model, tokenizer).vocab_size)


def load_bench_tokenizer(model: str, tokenizer: str | None) -> Any:
    """The tokenizer of ``tokenizer`` (or of ``model``): a preset's built-in one, or a folder's or
    hub id's through transformers. ValueError naming it when there is none."""
    from hwlm.presets.preset_tokenizers import tokenizer_path
    from hwlm.text.tokenizer import load_tokenizer

    name = tokenizer or model
    path = tokenizer_path(name)
    try:
        return load_tokenizer(str(path or name))
    except ValueError as exc:
        cause = " ".join(str(exc).split())[:300]
        raise ValueError(
            f"--dataset-name random needs the vocabulary of model '{model}': {cause}; "
            "pass --tokenizer"
        ) from exc
