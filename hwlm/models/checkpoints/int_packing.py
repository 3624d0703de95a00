"""Unpacking the int32 words AWQ and GPTQ store their codes in (``32 // bits`` codes a word,
the first in the lowest bits)."""

from __future__ import annotations

import torch


def unpack_last(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of int32 ``words`` [..., c] packed along the last dim -> [..., c * 32 // bits],
    code ``j`` of word ``i`` at position ``i * 32 // bits + j``."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, not {words.dtype}")
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * per_word).to(torch.uint8)


def unpack_first(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of int32 ``words`` [r, n] packed along the first dim -> [r * 32 // bits, n]."""
    return unpack_last(words.T.contiguous(), bits).T.contiguous()
