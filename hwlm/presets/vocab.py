"""A byte-level BPE vocabulary of any size, grown from the built-in 1,024-piece tokenizer.

Real words come first, so that English tokenizes at about one token per word: for each word of
``words.txt.gz`` (most frequent first) the word with a leading space, and for the commonest also
its capitalised and bare forms, each made reachable by a chain of merges appended after the
existing ones. Deterministic pronounceable pieces of 2-10 bytes then fill the vocabulary, so that
every id decodes to text (these are never produced by encoding, only by generation).

Everything here is pure Python on fixed inputs: the same arguments give the same vocabulary on
every machine and Python version.
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterator
from pathlib import Path

WORDS_FILE = Path(__file__).parent / "words.txt.gz"
SPACE = "Ġ"  # byte-level BPE's character for the space byte
ALL_FORMS = 1000  # the commonest words also get capitalised and bare tokens
_CONSONANTS = "bcdfghjklmnprstvwxz"
_VOWELS = "aeiouy"

Merge = tuple[str, str]


def load_words() -> list[str]:
    """The shipped English words, most frequent first (lower-case ASCII letters only)."""
    return gzip.decompress(WORDS_FILE.read_bytes()).decode("ascii").split()


def grow_vocab(
    tokens: list[str], merges: list[Merge], words: list[str], size: int, seed: int = 0
) -> tuple[list[str], list[Merge]]:
    """``tokens`` (a BPE vocabulary in id order) and ``merges`` (rank order), extended to ``size``
    regular tokens: word pieces first, then generated pieces. The inputs are not modified."""
    grower = _Grower(tokens, merges, size)
    for word in _word_forms(words):
        if grower.full():
            break
        grower.add_word(word)
    pieces = _pieces(random.Random(seed))
    while not grower.full():
        piece = next(pieces)
        if piece not in grower.index:
            grower.add_token(piece)
    return grower.tokens, grower.merges


def _word_forms(words: list[str]) -> Iterator[str]:
    for rank, word in enumerate(words):
        yield SPACE + word
        if rank < ALL_FORMS:
            title = word.capitalize()
            yield from (SPACE + title, title, word)


def _pieces(rng: random.Random) -> Iterator[str]:
    """Endless pronounceable pieces of 2-10 bytes of text (letters, most after a space)."""
    while True:
        length = rng.randint(2, 10)
        space = rng.random() < 0.6
        letters = []
        vowel = rng.random() < 0.3
        for _ in range(length - space):
            letters.append(rng.choice(_VOWELS if vowel else _CONSONANTS))
            vowel = not vowel if rng.random() < 0.8 else vowel
        text = "".join(letters)
        if rng.random() < 0.1:
            text = text.capitalize()
        yield (SPACE if space else "") + text


class _Grower:
    """A vocabulary and merge list that grow together; ``bpe`` encodes with the current merges."""

    def __init__(self, tokens: list[str], merges: list[Merge], size: int) -> None:
        self.tokens = list(tokens)
        self.merges = list(merges)
        self.index = {token: i for i, token in enumerate(self.tokens)}
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.size = size

    def full(self) -> bool:
        return len(self.tokens) >= self.size

    def add_token(self, token: str) -> None:
        self.index[token] = len(self.tokens)
        self.tokens.append(token)

    def add_word(self, word: str) -> None:
        """Make ``word`` one token: merge its current pieces left to right. Each step adds one
        merge, ranked after all others, so no earlier word's encoding changes."""
        if word in self.index:
            return
        pieces = self.bpe(word)
        if any(piece not in self.index for piece in pieces):
            return  # a character outside the byte alphabet
        needed = sum(1 for i in range(2, len(pieces) + 1) if "".join(pieces[:i]) not in self.index)
        if len(self.tokens) + needed > self.size:
            return
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in self.ranks:
                self.ranks[(left, right)] = len(self.merges)
                self.merges.append((left, right))
            left += right
            if left not in self.index:
                self.add_token(left)

    def bpe(self, word: str) -> list[str]:
        """``word``'s pieces under the current merges: the lowest-ranked adjacent pair first."""
        parts = list(word)
        ranks = self.ranks
        while len(parts) > 1:
            best, at = len(self.merges), -1
            for i in range(len(parts) - 1):
                rank = ranks.get((parts[i], parts[i + 1]))
                if rank is not None and rank < best:
                    best, at = rank, i
            if at < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        return parts
