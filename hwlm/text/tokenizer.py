"""Tokenizer loading (transformers' AutoTokenizer); detokenization lives in ``detokenizer``."""

from __future__ import annotations

import logging
from typing import Any

from hwlm.text.detokenizer import (
    Detokenizer,
    FastDetokenizer,
    IncrementalDetokenizer,
    decode_tokens,
    new_detokenizer,
)

__all__ = [
    "Detokenizer",
    "FastDetokenizer",
    "IncrementalDetokenizer",
    "decode_tokens",
    "load_tokenizer",
    "new_detokenizer",
]

logger = logging.getLogger(__name__)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """An AutoTokenizer from a local folder or hub id; a ValueError naming the path on failure."""
    from transformers import AutoTokenizer

    try:
        if path.lower().endswith(".gguf"):  # built from the file's own vocabulary
            folder, _, name = path.rpartition("/")
            tokenizer = AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)
            tokenizer.name_or_path = path  # what another process loads it from again
            return tokenizer
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
