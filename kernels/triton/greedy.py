"""Greedy sampling in one pass over the logits: each row's argmax and its log-probability.

The torch path converts the [batch, vocab] logits to float32 (a copy twice their size), then reads
that copy twice more (logsumexp, argmax). Here one program per row streams its logits once in
their own dtype, keeping a running maximum, the index where it was first reached, and the sum of
exp(x - max) in float32 (rescaled when the maximum grows, as online softmax does). The argmax's
log-probability is then ``-log(sum)``. Ties go to the lowest token id, as torch's argmax.

``masked_greedy_sample`` does the same over the tokens a grammar's bitmask allows (structured
outputs), reading the packed mask in the same pass instead of expanding it into a [batch, vocab]
boolean tensor and a masked copy of the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _greedy_kernel(
    logits_ptr: tl.tensor,
    tokens_ptr: tl.tensor,
    logprobs_ptr: tl.tensor,
    stride_row: tl.tensor,
    vocab: tl.tensor,
    BLOCK: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offsets = tl.arange(0, BLOCK)
    best = tl.full((), float("-inf"), tl.float32)
    best_id = tl.full((), 0, tl.int64)
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        block_best, block_id = tl.max(
            x, axis=0, return_indices=True, return_indices_tie_break_left=True
        )
        new_best = tl.maximum(best, block_best)
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(x - new_best), axis=0)
        best_id = tl.where(block_best > best, start + block_id.to(tl.int64), best_id)
        best = new_best
    tl.store(tokens_ptr + row, best_id)
    tl.store(logprobs_ptr + row, -tl.log(total))


def greedy_sample(
    logits: torch.Tensor, *, warp_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(argmax ids int64 [rows], their log-probabilities float32 [rows])`` of ``logits``
    [rows, vocab] (any float dtype; unit stride along the vocabulary)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(4096, triton.next_power_of_2(vocab))
        _greedy_kernel[(rows,)](
            logits, tokens, logprobs, logits.stride(0), vocab,
            BLOCK=block, num_warps=max(1, 8 * 32 // warp_size),
        )  # fmt: skip
    return tokens, logprobs


@triton.jit  # type: ignore[untyped-decorator]
def _masked_greedy_kernel(
    logits_ptr: tl.tensor,
    words_ptr: tl.tensor,
    tokens_ptr: tl.tensor,
    logprobs_ptr: tl.tensor,
    stride_row: tl.tensor,
    words_stride: tl.tensor,
    vocab: tl.tensor,
    num_words: tl.tensor,
    BLOCK: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    words = words_ptr + row * words_stride
    offsets = tl.arange(0, BLOCK)
    top = tl.full((), float("-inf"), tl.float32)  # of the raw logits (the normaliser's)
    total = tl.full((), 0.0, tl.float32)
    best = tl.full((), float("-inf"), tl.float32)  # of the allowed ones
    best_id = tl.full((), 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        word = tl.load(words + cols // 32, mask=(cols < vocab) & (cols // 32 < num_words), other=0)
        allowed = ((word >> (cols % 32)) & 1) != 0
        new_top = tl.maximum(top, tl.max(x, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
        top = new_top
        block_best, block_id = tl.max(
            tl.where(allowed, x, float("-inf")),
            axis=0,
            return_indices=True,
            return_indices_tie_break_left=True,
        )
        best_id = tl.where(block_best > best, start + block_id.to(tl.int64), best_id)
        best = tl.maximum(best, block_best)
    # A row that allows nothing takes token 0, as torch's argmax of a row of -inf does.
    chosen = tl.where(best > float("-inf"), best, tl.load(base).to(tl.float32))
    tl.store(tokens_ptr + row, best_id)
    tl.store(logprobs_ptr + row, chosen - top - tl.log(total))


def masked_greedy_sample(
    logits: torch.Tensor, words: torch.Tensor, *, warp_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``greedy_sample`` over the tokens each row's mask allows: ``words`` int32 [rows, n] on
    the device, bit ``j`` of word ``w`` allowing token ``32 * w + j`` (ids past the mask are
    forbidden). The log-probabilities are under the raw logits' softmax, as the sampler's."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    words = words.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(4096, triton.next_power_of_2(vocab))
        _masked_greedy_kernel[(rows,)](
            logits, words, tokens, logprobs, logits.stride(0), words.stride(0), vocab,
            words.shape[1], BLOCK=block, num_warps=max(1, 8 * 32 // warp_size),
        )  # fmt: skip
    return tokens, logprobs
