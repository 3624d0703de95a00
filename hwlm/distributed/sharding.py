"""How a model splits over ``tensor_parallel_size`` ranks: which slice of each weight a rank
keeps, and the one-line error for a model that does not split.

Query heads, the MLP's intermediate size and (for OPT) the hidden size split evenly. Key/value
heads split evenly too, or, when there are fewer of them than ranks, are replicated: each rank
keeps the one its query heads share (``num_kv_heads`` must then divide ``tensor_parallel_size``).
The vocabulary is padded to a multiple of the ranks (``vocab_shard``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hwlm.config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """Rows ``start .. start + size`` of a checkpoint dimension of ``full`` rows; rows past
    ``full`` are padding (zeros)."""

    start: int
    size: int
    full: int


def even_shard(full: int, rank: int, world_size: int) -> Shard:
    size = full // world_size
    return Shard(rank * size, size, full)


def head_shard(num_heads: int, head_size: int, rank: int, world_size: int) -> Shard:
    """This rank's heads of a ``num_heads * head_size`` projection: an even split, or one head
    replicated on ``world_size // num_heads`` ranks when there are fewer heads than ranks."""
    if num_heads >= world_size:
        per = num_heads // world_size
        return Shard(rank * per * head_size, per * head_size, num_heads * head_size)
    head = rank // (world_size // num_heads)
    return Shard(head * head_size, head_size, num_heads * head_size)


def vocab_shard(vocab_size: int, rank: int, world_size: int) -> Shard:
    """This rank's rows of the vocabulary, padded to ``ceil(vocab / world_size)`` per rank."""
    size = -(-vocab_size // world_size)
    return Shard(rank * size, size, vocab_size)


def kv_heads_per_rank(config: ModelConfig, world_size: int) -> int:
    return max(1, config.num_kv_heads // world_size)


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """ValueError (one line) when ``config`` cannot be split over ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world_size}")
    problems = []
    if config.num_heads % world_size:
        problems.append(f"num_attention_heads {config.num_heads}")
    kv = config.num_kv_heads
    if (kv >= world_size and kv % world_size) or (kv < world_size and world_size % kv):
        problems.append(f"num_key_value_heads {kv} (nor is it a divisor, to replicate)")
    if config.intermediate_size % world_size:
        problems.append(f"intermediate_size {config.intermediate_size}")
    if problems:
        raise ValueError(
            f"tensor_parallel_size {world_size} does not divide the model's "
            + ", ".join(problems)
            + f" ({config.architecture})"
        )
