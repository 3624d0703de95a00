"""Quality of a quantized KV cache: next-token distributions against the same model's own cache.

The model (float weights, ``--dtype``) reads a fixed token stream twice, as ``hwlm.bench.quality``
does for weight quantization: once with a KV cache of its own dtype, once with the cache in
``--kv-cache-dtype`` (fp8: float8_e4m3 at scale 1.0; bfloat16: a float32 model's cache on the
cpu backend). Only the cache differs, so the KL divergence and top-1 agreement measure what
storing keys and values that way costs. The same caveat as there: random weights give near-flat
distributions, where near-ties decide top-1.

Run: ``python -m hwlm.bench.kv_quality --model qwen2.5-0.5b --device cuda --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import logging

import torch

from hwlm.backend import Backend
from hwlm.bench.quality import (
    QualityResult,
    add_stream_options,
    compare,
    load_format_for,
    report,
    stream_logits,
    token_stream,
)
from hwlm.config import ModelConfig, kv_cache_torch_dtype, parse_dtype
from hwlm.engine_args import KV_CACHE_DTYPES
from hwlm.models.loader import load_model, resolve_model
from hwlm.registry import select_backend

logger = logging.getLogger(__name__)


def measure_kv_cache(
    model: str,
    kv_cache_dtypes: list[str],
    num_tokens: int = 512,
    device: str = "cuda",
    load_format: str = "auto",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    backend: Backend | None = None,
) -> list[QualityResult]:
    """One result (named ``kv-cache <name>``) per entry of ``kv_cache_dtypes``, against the
    model with a ``dtype`` cache. ``backend`` (an instance) overrides ``device``."""
    resolved = resolve_model(model, load_format)
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    backend = backend or select_backend(device)()
    built = load_model(resolved, config, backend, dtype, load_format, seed)
    backend.prepare_model(built)
    tokens = token_stream(config.vocab_size, num_tokens, seed)
    reference = stream_logits(built, backend, tokens, dtype)
    results = []
    for name in kv_cache_dtypes:
        logits = stream_logits(built, backend, tokens, kv_cache_torch_dtype(name, dtype))
        mean_kl, max_kl, top1, entropy = compare(reference, logits)
        label = f"kv-cache {name} vs {str(dtype).removeprefix('torch.')}"
        results.append(QualityResult(model, label, num_tokens, mean_kl, max_kl, top1, entropy))
    return results


def main(argv: list[str] | None = None) -> list[QualityResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hwlm-tiny", help="preset name or model folder")
    parser.add_argument(
        "--kv-cache-dtype",
        nargs="+",
        default=["fp8"],
        choices=[k for k in KV_CACHE_DTYPES if k != "auto"],
    )
    parser.add_argument("--dtype", default="float32", help="the model's (and reference cache's)")
    add_stream_options(parser, device="cuda")
    args = parser.parse_args(argv)
    results = measure_kv_cache(
        args.model,
        args.kv_cache_dtype,
        args.num_tokens,
        args.device,
        load_format_for(args.model, args.load_format),
        args.seed,
        parse_dtype(args.dtype),
    )
    report(results, "reference entropy", args.output_json)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    main()
