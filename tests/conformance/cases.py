"""Op-level conformance cases: inputs, a float64 reference, sentinel-filled caches.

Every case builds a paged KV cache whose blocks are a shuffled, non-contiguous subset of a larger
pool. Blocks and slots a case must not touch hold a sentinel pattern: finite, large values (so
that reading them by mistake changes the result) that are compared bit for bit afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hwlm.attention import AttentionMetadata
from hwlm.backend import Backend
from hwlm.config import EngineConfig, ModelConfig
from hwlm.kernels.reference import to_fp8

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Max abs error allowed against the float64 reference, per dtype of the inputs. Outputs are
# convex combinations of N(0, 1) values, so these are errors relative to values of order one.
ATTENTION_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
NORM_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}
SENTINEL_SCALE = 1000.0
NUM_KV_HEADS = 2

# (query_len, seq_len) per sequence, for each family of attention batch.
BATCHES: dict[str, list[tuple[int, int]]] = {
    "prefill": [(7, 7), (33, 33), (1, 1)],
    "chunked-prefix": [(5, 37), (16, 40), (3, 19)],
    "decode": [(1, 1), (1, 29), (1, 64), (1, 17)],
    "mixed": [(9, 9), (6, 30), (1, 45), (1, 3)],
}


@dataclass(frozen=True)
class AttentionCase:
    batch: str
    dtype: str
    block_size: int
    gqa: int
    head_size: int
    kv_cache_dtype: str = "auto"  # fp8: the cache holds float8_e4m3fn with KV_SCALES

    @property
    def id(self) -> str:
        kv = "" if self.kv_cache_dtype == "auto" else f"-kv{self.kv_cache_dtype}"
        return f"{self.batch}-{self.dtype}-bs{self.block_size}-gqa{self.gqa}-d{self.head_size}{kv}"

    @property
    def num_heads(self) -> int:
        return NUM_KV_HEADS * self.gqa


def unsupported_reason(
    backend: Backend,
    dtype: str,
    block_size: int,
    gqa: int,
    head_size: int,
    kv_cache_dtype: str = "auto",
) -> str:
    """The backend's own reasons for refusing a configuration ('' when it accepts it)."""
    num_heads = NUM_KV_HEADS * gqa
    model = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128,
            "hidden_size": num_heads * head_size,
            "head_dim": head_size,
            "num_hidden_layers": 1,
            "num_attention_heads": num_heads,
            "num_key_value_heads": NUM_KV_HEADS,
            "intermediate_size": 64,
            "torch_dtype": dtype,
        }
    )
    engine = EngineConfig(max_model_len=128, block_size=block_size, kv_cache_dtype=kv_cache_dtype)
    return "; ".join(backend.check(model, engine, DTYPES[dtype]))


def sentinel_like(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul(SENTINEL_SCALE).to(dtype)
    )


def fp8_sentinel_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A sentinel pattern for fp8 caches: large (up to 400, within e4m3's 448), finite values."""
    return sentinel_like(shape, torch.float32, seed).mul(0.4).to(torch.float8_e4m3fn)


@dataclass
class PagedBatch:
    """A batch laid out in a shuffled paged cache."""

    cache: torch.Tensor  # [2, pool, block_size, kv_heads, head_size], on the backend's device
    metadata: AttentionMetadata
    query: torch.Tensor
    context_slots: list[torch.Tensor]  # per sequence, the flat slot of each context token
    used_blocks: torch.Tensor
    # fp8 caches: the scales (float32 [1], on the device) and, on the CPU in float64, the same
    # layout holding the keys and values before fp8 rounding (None otherwise).
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    unquantized: torch.Tensor | None = None


def build_paged_batch(
    backend: Backend,
    case: AttentionCase,
    seed: int = 0,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> PagedBatch:
    """Random N(0, 1) queries, keys and values. For an fp8 case the cache holds the keys and
    values divided by ``kv_scales`` and rounded to e4m3 (as ``write_kv`` stores them), so that
    the values attention reads back (``fp8 * scale``) are again about N(0, 1)."""
    dtype = DTYPES[case.dtype]
    fp8 = case.kv_cache_dtype != "auto"
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    device = backend.device
    g = torch.Generator().manual_seed(seed)
    bs, kvh, d = case.block_size, NUM_KV_HEADS, case.head_size
    seqs = BATCHES[case.batch]
    blocks_per_seq = [math.ceil(seq_len / bs) for _, seq_len in seqs]
    pool = 2 * sum(blocks_per_seq) + 3
    physical = torch.randperm(pool, generator=g)[: sum(blocks_per_seq)]
    [cache] = backend.allocate_kv_cache(1, pool, bs, kvh, d, cache_dtype)
    if fp8:
        cache.copy_(fp8_sentinel_like(tuple(cache.shape), seed + 1).to(device))
    else:
        cache.copy_(sentinel_like(tuple(cache.shape), dtype, seed + 1).to(device))
    scales = torch.tensor(kv_scales, dtype=torch.float32)
    unquantized = torch.zeros(cache.shape, dtype=torch.float64) if fp8 else None
    block_tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32)
    context_slots = []
    start = 0
    for i, ((_, seq_len), n) in enumerate(zip(seqs, blocks_per_seq, strict=True)):
        table = physical[start : start + n]
        start += n
        block_tables[i, :n] = table.to(torch.int32)
        pos = torch.arange(seq_len)
        slots = table[pos // bs] * bs + pos % bs
        context_slots.append(slots)
        kv = torch.randn(2, seq_len, kvh, d, generator=g, dtype=torch.float64).to(dtype)
        if unquantized is not None:
            unquantized.view(2, pool * bs, kvh, d)[:, slots] = kv.double()
            kv = torch.stack([to_fp8(kv[0], scales[:1]), to_fp8(kv[1], scales[1:])])
        cache.view(2, pool * bs, kvh, d)[:, slots.to(device)] = kv.to(device)
    query_lens = [q for q, _ in seqs]
    query_start = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    new_slots = torch.cat([s[len(s) - q :] for s, q in zip(context_slots, query_lens, strict=True)])
    metadata = AttentionMetadata(
        query_start_loc=query_start,
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=new_slots.to(torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(s for _, s in seqs),
    ).to(device)
    query = torch.randn(sum(query_lens), case.num_heads, d, generator=g, dtype=torch.float64)
    batch = PagedBatch(cache, metadata, query.to(dtype).to(device), context_slots, physical)
    if fp8:
        batch.k_scale, batch.v_scale = scales[:1].to(device), scales[1:].to(device)
        batch.unquantized = unquantized
    return batch
