"""A seconds-long smoke test of one backend: write a small paged KV cache, attend, compare with
the float64 torch reference. Used by `hwlm devices --check`."""

from __future__ import annotations

import torch

from hwlm.attention import AttentionMetadata
from hwlm.backend import Backend

_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def smoke_test(backend_class: type[Backend]) -> tuple[bool, str]:
    """(passed, one-line detail). Any exception counts as a failure, with its message."""
    try:
        return _run(backend_class())
    except Exception as exc:  # a broken backend must be reported, not crash the listing
        return False, f"{type(exc).__name__}: {exc}"


def _run(backend: Backend) -> tuple[bool, str]:
    from hwlm.kernels import reference

    dtype = backend.preferred_dtype
    device = backend.device
    g = torch.Generator().manual_seed(0)
    block_size, kv_heads, heads, head_size = 16, 2, 4, 64
    seq_lens, query_lens = [20, 37], [20, 1]  # a prefill and a decode
    [cache] = backend.allocate_kv_cache(1, 8, block_size, kv_heads, head_size, dtype)
    tables = torch.tensor([[5, 2, 0], [7, 1, 3]], dtype=torch.int32)
    slots = torch.cat(
        [
            tables[i, torch.arange(n) // block_size].long() * block_size
            + torch.arange(n) % block_size
            for i, n in enumerate(seq_lens)
        ]
    )
    keys = torch.randn(len(slots), kv_heads, head_size, generator=g).to(dtype).to(device)
    values = torch.randn(len(slots), kv_heads, head_size, generator=g).to(dtype).to(device)
    backend.write_kv(keys, values, cache, slots.to(device))
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, 20, 21], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.cat([slots[:20], slots[-1:]]),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    query = torch.randn(sum(query_lens), heads, head_size, generator=g).to(dtype).to(device)
    out = backend.attention(query, cache, metadata.to(device), head_size**-0.5)
    backend.synchronize()
    expected = reference.paged_attention(
        query.cpu().double(), cache.cpu().double(), metadata, head_size**-0.5, torch.float64
    )
    err = (out.cpu().double() - expected).abs().max().item()
    ok = err <= _TOLERANCE.get(dtype, 1e-3) and not out.isnan().any().item()
    return ok, f"paged attention ({dtype}) max error {err:.1e}"
