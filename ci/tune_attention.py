"""Sweep the paged-attention launch settings on the batch shapes of the GPU workloads.

    python ci/tune_attention.py

For each shape (a G3 decode step, a G3 step with prefill, a G2 decode step) times every launch
variant with CUDA events and prints the default (``choose_launch``) and the five fastest, with the
KV bytes read per second for decode shapes.
"""

from __future__ import annotations

import itertools

import torch
import triton

from hwlm.attention import AttentionMetadata
from hwlm.kernels.triton.paged_attention import AttentionLaunch, choose_launch, paged_attention

BLOCK_SIZE = 16


def batch(
    q_lens: list[int], ctx_lens: list[int], heads: int, kv_heads: int, head: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    dev = torch.device("cuda")
    blocks = [triton.cdiv(c, BLOCK_SIZE) for c in ctx_lens]
    pool = sum(blocks) + 8
    cache = torch.randn(2, pool, BLOCK_SIZE, kv_heads, head, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(pool, device=dev)
    tables = torch.zeros(len(ctx_lens), max(blocks), dtype=torch.int32, device=dev)
    start = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[start : start + n].to(torch.int32)
        start += n
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=dev)
    query = torch.randn(sum(q_lens), heads, head, device=dev, dtype=torch.bfloat16)
    meta = AttentionMetadata(
        qsl,
        torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
        tables,
        torch.full((sum(q_lens),), -1, dtype=torch.int64, device=dev),
        max(q_lens),
        max(ctx_lens),
    )
    return query, cache, meta


def timed(fn, reps: int = 30) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps  # ms


def sweep(name: str, q_lens: list[int], ctx: list[int], heads: int, kv: int, head: int) -> None:
    query, cache, meta = batch(q_lens, ctx, heads, kv, head)
    scale = head**-0.5
    kv_bytes = sum(ctx) * kv * head * 2 * 2
    default = choose_launch(
        num_seqs=len(ctx),
        num_kv_heads=kv,
        group=heads // kv,
        head_size=head,
        max_query_len=max(q_lens),
        max_seq_len=max(ctx),
    )
    group_pad = triton.next_power_of_2(heads // kv)
    results = []
    if max(q_lens) > 1:
        grid = itertools.product([64, 128], [32, 64], [4, 8], [2, 3])
    else:
        grid = itertools.product([max(16, group_pad)], [32, 64, 128], [2, 4, 8], [2, 3])
    for block_m, block_n, warps, stages in grid:
        if block_m < group_pad or (head > 128 and block_n > 64):
            continue
        launch = AttentionLaunch(block_m, block_n, default.num_splits, warps, stages)
        try:
            ms = timed(
                lambda launch=launch: paged_attention(query, cache, meta, scale, launch=launch)
            )
        except Exception as exc:  # out of resources for this tile
            print(f"  skip {launch}: {type(exc).__name__}")
            continue
        results.append((ms, launch))
    base = timed(lambda: paged_attention(query, cache, meta, scale))
    print(f"== {name}: {len(ctx)} seqs, {sum(q_lens)} query tokens, KV {kv_bytes / 1e9:.2f} GB")
    print(f"  default {default}: {base:.3f} ms ({kv_bytes / base / 1e9:.0f} GB/s of KV)")
    for ms, launch in sorted(results, key=lambda r: r[0])[:5]:
        print(f"  {ms:.3f} ms ({kv_bytes / ms / 1e9:.0f} GB/s) {launch}")


def main() -> None:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 1025, (256,), generator=g).tolist()
    g3_decode_ctx = [p + 128 for p in prompts]
    sweep("G3 decode (Qwen2.5-0.5B)", [1] * 256, g3_decode_ctx, 14, 2, 64)
    # A G3 step with prefill: 14 whole prompts beside 242 decode rows.
    q_lens = [1] * 242 + prompts[242:]
    ctx = [p + 1 for p in prompts[:242]] + prompts[242:]
    sweep("G3 step with prefill (Qwen2.5-0.5B)", q_lens, ctx, 14, 2, 64)
    g2 = torch.randint(100, 1025, (2, 160), generator=g)
    sweep("G2 decode (Qwen3-0.6B)", [1] * 160, (g2[0] + g2[1] // 2).tolist(), 16, 8, 128)
    sweep("G1 decode (Llama-3-8B)", [1] * 256, [384] * 256, 32, 8, 128)


if __name__ == "__main__":
    main()
