"""Quality of quantized weights: next-token distributions against the unquantized model.

Both models are built from the same weights (a checkpoint, or the same seeded random weights)
and read the same fixed token stream (seeded random ids) as one sequence, prefilled in chunks
over a paged KV cache, as the engine would. At every position the float model's distribution
``p`` and the quantized model's ``q`` give ``KL(p || q)`` (nats) and whether their top tokens agree.

Random weights make quantization error look different from a trained model's: their values are
Gaussian, with none of the outlier channels real models have (which hurt int8's per-tensor
activation scale most), and their next-token distributions are nearly flat, so top-1 agreement
is decided among near-ties. Figures on dummy weights say the kernels work, not what a trained
model of that shape loses.

Run: ``python ci/quant_quality.py --model c1-llama --quantization int8 int4``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass

import torch

from hwlm.attention import AttentionMetadata, ForwardContext
from hwlm.backend import Backend
from hwlm.config import ModelConfig
from hwlm.engine_args import QUANTIZATIONS
from hwlm.models import CausalLM
from hwlm.models.loader import load_model, resolve_model
from hwlm.registry import select_backend

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16
CHUNK = 128  # prefill chunk, tokens


@dataclass
class QualityResult:
    model: str
    quantization: str
    tokens: int
    mean_kl: float  # nats, mean over positions of KL(float || quantized)
    max_kl: float
    top1_agreement: float  # fraction of positions whose argmax tokens are equal
    reference_entropy: float  # nats, mean over positions of the float model's entropy


def token_stream(vocab_size: int, num_tokens: int, seed: int = 0) -> list[int]:
    """The fixed stream the models read: seeded uniform ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=gen).tolist()


def stream_logits(
    model: CausalLM, backend: Backend, tokens: list[int], kv_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """float32 logits [len(tokens), vocab] of one sequence, prefilled ``CHUNK`` tokens a step,
    over a KV cache of ``kv_dtype`` (``hwlm.bench.kv_quality`` passes fp8)."""
    cfg = model.config
    num_blocks = math.ceil(len(tokens) / BLOCK_SIZE)
    caches = backend.allocate_kv_cache(
        cfg.num_layers, num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_size, kv_dtype
    )
    table = torch.arange(num_blocks, dtype=torch.int32)[None]
    out = []
    for start in range(0, len(tokens), CHUNK):
        end = min(start + CHUNK, len(tokens))
        metadata = AttentionMetadata(
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            block_tables=table,
            slot_mapping=torch.arange(start, end, dtype=torch.int64),
            max_query_len=end - start,
            max_seq_len=end,
        ).to(backend.device)
        ctx = ForwardContext(backend, caches, metadata)
        ids = torch.tensor(tokens[start:end]).to(backend.device)
        positions = torch.arange(start, end).to(backend.device)
        with torch.inference_mode():
            hidden = model(ids, positions, ctx)
            out.append(model.compute_logits(hidden).cpu())
    return torch.cat(out)


def compare(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float, float, float]:
    """(mean KL, max KL, top-1 agreement, mean entropy of the reference) of ``logits`` against
    ``reference`` [n, vocab]."""
    log_p = torch.log_softmax(reference.double(), -1)
    log_q = torch.log_softmax(logits.double(), -1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    entropy = -(p * log_p).sum(-1).mean().item()
    agree = (reference.argmax(-1) == logits.argmax(-1)).double().mean()
    return kl.mean().item(), kl.max().item(), agree.item(), entropy


def measure(
    model: str,
    methods: list[str],
    num_tokens: int = 512,
    device: str = "cpu",
    load_format: str = "auto",
    seed: int = 0,
) -> list[QualityResult]:
    """One result per method in ``methods``, each against the float model."""
    resolved = resolve_model(model, load_format)
    config = ModelConfig.from_hf_dict(resolved.hf_config)
    backend = select_backend(device)()
    tokens = token_stream(config.vocab_size, num_tokens, seed)

    def logits(method: str | None) -> torch.Tensor:
        built = load_model(resolved, config, backend, torch.float32, load_format, seed, method)
        backend.prepare_model(built)  # as the engine's runner does
        return stream_logits(built, backend, tokens)

    reference = logits(None)
    results = []
    for method in methods:
        mean_kl, max_kl, top1, entropy = compare(reference, logits(method))
        results.append(QualityResult(model, method, num_tokens, mean_kl, max_kl, top1, entropy))
    return results


def main(argv: list[str] | None = None) -> list[QualityResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="c1-llama", help="preset name or model folder")
    parser.add_argument(
        "--quantization",
        nargs="+",
        choices=QUANTIZATIONS,
        help="methods to measure (default: every method the device's backend runs)",
    )
    add_stream_options(parser, device="cpu")
    args = parser.parse_args(argv)
    load_format = load_format_for(args.model, args.load_format)
    methods = args.quantization or list(select_backend(args.device).quantizations)
    results = measure(args.model, methods, args.num_tokens, args.device, load_format, args.seed)
    report(results, "float model's entropy", args.output_json)
    return results


def add_stream_options(parser: argparse.ArgumentParser, device: str) -> None:
    """The options of both quality commands (this one and ``hwlm.bench.kv_quality``)."""
    parser.add_argument("--num-tokens", type=int, default=512)
    parser.add_argument("--device", default=device)
    parser.add_argument("--load-format", default=None, help="default: dummy for a preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", help="write the results here")


def load_format_for(model: str, given: str | None) -> str:
    """``given``, else dummy weights for a preset and the checkpoint's own otherwise."""
    from hwlm.presets import find_preset

    return given or ("dummy" if find_preset(model) else "auto")


def report(results: list[QualityResult], entropy_label: str, output_json: str | None) -> None:
    """One line per result (the commands' output), and the results as JSON to ``output_json``."""
    for r in results:
        print(
            f"{r.model} {r.quantization}: mean KL {r.mean_kl:.3g} nats, max KL {r.max_kl:.3g}, "
            f"top-1 agreement {100 * r.top1_agreement:.1f}% over {r.tokens} tokens "
            f"({entropy_label} {r.reference_entropy:.2f} nats)"
        )
    if output_json:
        with open(output_json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
