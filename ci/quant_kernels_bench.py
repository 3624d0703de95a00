"""Per-layer time of the cuda backend's quantized dense layers against bf16 (``F.linear``), on
Llama-3-8B's projection shapes, at M = 1, 16, 256, 4096 rows; plus the launch sweep of the W4A16
GEMV, the tile kernel against dequantize-then-matmul, and the per-token fp8 quantization kernel
against the torch sequence. Run by ci/gpu_quant.sh.

    python ci/quant_kernels_bench.py --output-json /tmp/kernels.json [--quick]

On the CPU (``--device triton-interpret`` with ``TRITON_INTERPRET=1``) it runs on tiny shapes, to
check the script itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("quant_kernels_bench")

# (name, N, K) of Llama-3-8B: fused q/k/v, o, fused gate/up, down, LM head.
LLAMA3_8B = [
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
]
TINY = [("qkv", 96, 64), ("down", 64, 256)]
ROWS = [1, 16, 256, 4096]


def timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds per call: CUDA-graph replays where possible (as decode runs), else events."""
    if device != "cuda":
        import time

        def wall(fn: Callable[[], Any]) -> float:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return wall
    import triton.testing

    def gpu(fn: Callable[[], Any]) -> float:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=50))
        except Exception as err:  # a path that cannot be captured is still timed
            logger.warning("graph timing failed (%s); timing eagerly", err)
            return float(triton.testing.do_bench(fn, warmup=10, rep=50))

    return gpu


def sweep_launches(bits: int) -> list[Any]:
    """GEMV launches to time: output block x K tile x split-K at 4 warps, plus fewer warps for
    narrow blocks and deeper pipelining."""
    from hwlm.kernels.triton.w4a16 import Launch

    per_word = 32 // bits
    out = []
    for block_n in (8, 16, 32, 64):
        for block_k in (per_word * 16, per_word * 32):
            for split in (1, 2):
                out.append(Launch(1, block_n, block_k, split, 4, 3))
    out += [Launch(1, n, per_word * 16, 1, 2, 3) for n in (8, 16)]
    out += [Launch(1, n, per_word * 32, 1, 2, 3) for n in (8, 16)]
    out += [Launch(1, n, per_word * 16, 1, 4, 4) for n in (16, 32)]
    out += [Launch(1, n, per_word * 16, 4, 4, 3) for n in (16, 32)]
    # Wide blocks: each thread owns several rows, so each activation it loads serves them all.
    out += [Launch(1, 64, per_word * 16, s, 4, 3) for s in (2, 4)]
    out += [Launch(1, 128, per_word * 16, s, 4, 3) for s in (4, 8)]
    out += [Launch(1, 64, per_word * 16, 1, w, 3) for w in (1, 2)]
    return out


def dequant_mm(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """The prefill path: the float weights written once, then cuBLAS."""
    from hwlm.kernels.triton import w4a16

    return F.linear(x, w4a16.dequantize(packed, x.dtype))


def bench_shape(
    name: str, n: int, k: int, rows: list[int], device: torch.device, time_ms: Any, sweep: bool
) -> list[dict[str, Any]]:
    from hwlm.backends import cuda_quant
    from hwlm.kernels.triton import w4a16

    dtype = torch.bfloat16
    num_sms = (
        torch.cuda.get_device_properties(0).multi_processor_count if device.type == "cuda" else 4
    )
    weight = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    int4 = cuda_quant.quantized_linear(weight, None, "int4", num_sms)
    fp8 = cuda_quant.quantized_linear(weight, None, "fp8", num_sms)
    assert isinstance(int4, cuda_quant.W4A16Linear)
    results = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=dtype)
        row: dict[str, Any] = {"layer": name, "n": n, "k": k, "m": m}
        row["bf16_ms"] = time_ms(partial(F.linear, x, weight))
        row["int4_ms"] = time_ms(partial(int4, x))
        row["fp8_ms"] = time_ms(partial(fp8, x))
        packed = int4.weight
        if m > w4a16.GEMV_MAX_ROWS:
            tiles = w4a16.choose_launch(packed, m, num_sms)
            row["int4_tiles_ms"] = time_ms(partial(w4a16.w4a16_linear, x, packed, None, 0, tiles))
            row["int4_dequant_mm_ms"] = time_ms(partial(dequant_mm, x, packed))
        reference = F.linear(x.float(), int4.dequantized_weight()).float()
        row["int4_max_abs_err"] = (int4(x).float() - reference).abs().max().item()
        exact = F.linear(x.float(), weight.float())
        rel = (fp8(x).float() - exact).norm() / exact.norm()
        row["fp8_rel_err"] = rel.item()  # per-token fp8 activations and weights: about 3-5%
        row["int4_weight_GBps"] = packed.words.numel() * 4 / row["int4_ms"] / 1e6
        row["bf16_weight_GBps"] = n * k * 2 / row["bf16_ms"] / 1e6
        if sweep and m == 1:
            best = None
            sweep: dict[str, float] = {}
            for launch in sweep_launches(4):
                try:
                    ms = time_ms(partial(w4a16.w4a16_linear, x, packed, None, 0, launch))
                except Exception as exc:  # a launch the compiler refuses: skip it
                    logger.info("launch %s failed: %s", launch, exc)
                    continue
                sweep[repr(launch)] = ms
                if best is None or ms < best[0]:
                    best = (ms, launch)
            row["int4_sweep_ms"] = sweep
            if best is not None:
                row["int4_best_ms"] = best[0]
                row["int4_best_launch"] = repr(best[1])
            row["int4_default_launch"] = repr(w4a16.choose_launch(packed, 1, num_sms))
        results.append(row)
        logger.info("%s", row)
    return results


def bench_fp8_quant(
    rows: list[int], k: int, device: torch.device, time_ms: Any
) -> list[dict[str, Any]]:
    from hwlm.kernels.triton import fp8_quant

    out = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        out.append(
            {
                "m": m,
                "k": k,
                "triton_ms": time_ms(partial(fp8_quant.quantize_rows, x)),
                "torch_ms": time_ms(partial(fp8_quant.quantize_rows_torch, x)),
            }
        )
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'layer':8} {'N':>6} {'K':>6} {'M':>5} {'bf16 us':>9} {'int4 us':>9} {'x bf16':>7} "
        f"{'fp8 us':>9} {'x bf16':>7} {'int4 GB/s':>9}  notes"
    ]
    for r in results:
        notes = []
        if "int4_best_ms" in r:
            notes.append(f"best GEMV {1e3 * r['int4_best_ms']:.1f} us {r['int4_best_launch']}")
        if "int4_dequant_mm_ms" in r:
            notes.append(
                f"tiles {1e3 * r['int4_tiles_ms']:.1f} us, dequant+mm "
                f"{1e3 * r['int4_dequant_mm_ms']:.1f} us"
            )
        lines.append(
            f"{r['layer']:8} {r['n']:6} {r['k']:6} {r['m']:5} {1e3 * r['bf16_ms']:9.1f} "
            f"{1e3 * r['int4_ms']:9.1f} {r['bf16_ms'] / r['int4_ms']:7.2f} "
            f"{1e3 * r['fp8_ms']:9.1f} {r['bf16_ms'] / r['fp8_ms']:7.2f} "
            f"{r['int4_weight_GBps']:9.0f}  {'; '.join(notes)}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "triton-interpret"])
    parser.add_argument("--quick", action="store_true", help="no launch sweep")
    parser.add_argument("--rows", type=int, nargs="+", help=f"M values (default: {ROWS})")
    parser.add_argument("--output-json", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "triton-interpret":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shapes, rows = torch.device("cpu"), TINY, [1, 16]
    else:
        device, shapes, rows = torch.device("cuda"), LLAMA3_8B, ROWS
    rows = args.rows or rows
    time_ms = timer(device.type)
    results = []
    for name, n, k in shapes:
        results += bench_shape(name, n, k, rows, device, time_ms, sweep=not args.quick)
    quant = bench_fp8_quant(rows, shapes[0][2], device, time_ms)
    text = table(results)
    text += f"\n\nper-token fp8 quantization (K = {shapes[0][2]}): " + ", ".join(
        f"M={q['m']}: triton {1e3 * q['triton_ms']:.1f} us / torch {1e3 * q['torch_ms']:.1f} us"
        for q in quant
    )
    print(text)
    with open(args.output_json, "w", encoding="utf-8") as f:
        json.dump({"layers": results, "fp8_quant": quant}, f, indent=2)


if __name__ == "__main__":
    main()
