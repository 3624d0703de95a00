"""Incremental detokenization (hwlm.text.detokenizer): the streamed text equals the all-at-once
decode, byte for byte, token after token.

Tokenizers are trained here, in a temporary folder, for three families: byte-level BPE (GPT-2 /
Qwen: ByteLevel pre-tokenizer and decoder), SentencePiece-style BPE with byte fallback (Llama:
Metaspace "▁", decoders Replace ▁→space, ByteFallback, Fuse, Strip) and the same without Strip
(Gemma). Each has special tokens and an added non-special token.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hwlm.text import detokenizer
from hwlm.text.detokenizer import (
    REPLACEMENT,
    Detokenizer,
    FastDetokenizer,
    IncrementalDetokenizer,
    new_detokenizer,
)
from hwlm.text.tokenizer import IncrementalDetokenizer as ReExported
from hwlm.text.tokenizer import decode_tokens

CORPUS = [
    "Hello world, this is a test. The quick brown fox jumps over the lazy dog.",
    "def foo(x):\n    return x + 1\n\n",
    "  leading spaces and\ttabs\n\nnew lines, numbers 12345 and punctuation!?",
    "日本語のテキストと中文文本 😀🎉 naïve café",
] * 30
TEXTS = [
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "naïve café 😀🎉 日本語 中文",
    "a\nb\n\n  c\td",
    "x <tool> y <tool>z",
    "emoji at the end 🎉",
    "ß∑∂ƒ©˙∆˚¬…æ",
]
BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
NUM_RANDOM = 900


# --- tokenizers ---------------------------------------------------------------------------------


def _byte_level(folder: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(folder)


def _sentencepiece(folder: Path, strip: bool) -> None:
    """Llama style: the vocabulary starts with the special tokens and the 256 <0x..> pieces."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=LLAMA_SPECIALS, limit_alphabet=60, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = {token: i for i, token in enumerate(LLAMA_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(LLAMA_SPECIALS) + b for b in range(256)})
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    tok = Tokenizer.from_str(json.dumps(spec))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if strip else []))
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(folder)


def _load(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Any:
    folder = tmp_path_factory.mktemp(name)
    build(folder)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _load(tmp_path_factory, "byte_level", _byte_level)


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _load(tmp_path_factory, "llama", lambda folder: _sentencepiece(folder, strip=True))


@pytest.fixture(scope="session")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _load(tmp_path_factory, "gemma", lambda folder: _sentencepiece(folder, strip=False))


@pytest.fixture(params=["byte_level", "llama", "gemma"])
def tok(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["library", "replay"])
def copy_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """copy() through DecodeStream's own copy, and by replaying the tokens into a fresh one."""
    monkeypatch.setattr(detokenizer, "_STREAM_COPIES", request.param == "library")
    return str(request.param)


# --- helpers ------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


@functools.cache
def vocab_of(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


@functools.cache
def single_bytes(tokenizer: Any) -> tuple[int, ...]:
    """The ids of the pieces that are exactly one byte (byte-level chars or <0x..> pieces)."""
    vocab, table = vocab_of(tokenizer), _bytes_to_unicode()
    pieces = [f"<0x{b:02X}>" if f"<0x{b:02X}>" in vocab else table[b] for b in range(256)]
    return tuple(vocab[piece] for piece in pieces)


@functools.cache
def invisible(tokenizer: Any, skip: bool) -> frozenset[int]:
    """Ids that decode as nothing: the special ones (when skipped), the first beyond the vocab."""
    specials = set(tokenizer.all_special_ids) if skip else set()
    return frozenset(specials | {len(tokenizer)})


@functools.cache
def byte_pieces(tokenizer: Any) -> frozenset[int]:
    return frozenset(i for t, i in vocab_of(tokenizer).items() if t.startswith("<0x"))


def byte_ids(tokenizer: Any, data: bytes) -> list[int]:
    return [single_bytes(tokenizer)[b] for b in data]


def special(tokenizer: Any, which: str) -> int:
    """The id of the tokenizer's BOS / EOS / end-of-turn special token."""
    names = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "turn": "<|im_end|>"}
    return int(tokenizer.convert_tokens_to_ids(names[which]))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def may_hold(det: Detokenizer, tokenizer: Any, ref: str) -> bool:
    """Whether the exact text may lag ``ref``: an incomplete (or U+FFFD) last character, or an
    open run of byte-fallback pieces (a later byte piece could still invalidate it)."""
    if ref.endswith(REPLACEMENT):
        return True
    nothing = invisible(tokenizer, bool(det.skip))  # type: ignore[attr-defined]
    for token_id in reversed(det.token_ids):
        if token_id not in nothing:
            return token_id in byte_pieces(tokenizer)
    return False


def feed(det: Detokenizer, tokenizer: Any, ids: list[int]) -> list[str]:
    """Add ``ids`` one at a time, checking the contract after each: the text is a prefix of the
    decode of the tokens so far (nothing a later token could change is emitted), it equals that
    decode unless a character is incomplete, and ``final_text`` always equals it."""
    skip, spaces = bool(det.skip), bool(det.spaces)  # type: ignore[attr-defined]
    pieces = []
    for token_id in ids:
        before = det.text
        pieces.append(det.add(token_id))
        assert det.text_length == len(before) + len(pieces[-1])
        ref = decode_tokens(tokenizer, det.token_ids, skip, spaces)
        assert det.text == before + pieces[-1], where(det, tokenizer)
        assert ref.startswith(det.text), f"{where(det, tokenizer)}: not a prefix of {ref!r}"
        assert det.final_text == ref, where(det, tokenizer)
        if not may_hold(det, tokenizer, ref):
            assert det.text == ref, f"{where(det, tokenizer)}: held {ref[len(det.text) :]!r}"
    return pieces


def where(det: Detokenizer, tokenizer: Any) -> str:
    """The state of ``det``, for a failure message."""
    pieces = tokenizer.convert_ids_to_tokens(det.token_ids)
    return f"text {det.text!r} after {det.token_ids} {pieces}"


def check_exact(
    tokenizer: Any, ids: list[int], skip: bool = True, spaces: bool = True
) -> tuple[list[str], str]:
    """Stream ``ids`` through the fast detokenizer; return the pieces and the held rest."""
    det = new_detokenizer(tokenizer, skip, spaces)
    assert isinstance(det, FastDetokenizer)
    pieces = feed(det, tokenizer, ids)
    ref = decode_tokens(tokenizer, ids, skip, spaces)
    assert "".join(pieces) == det.text
    rest = det.finish()
    assert "".join(pieces) + rest == det.text == det.final_text == ref
    return pieces, rest


def random_ids(tokenizer: Any, rng: random.Random, length: int) -> list[int]:
    """Token ids biased to the hard cases: single bytes (invalid UTF-8 runs included), pieces
    with partial characters, special and added tokens, spaces, ids beyond the vocabulary."""
    pools = id_pools(tokenizer)
    return [rng.choice(rng.choices(pools, POOL_WEIGHTS)[0]) for _ in range(length)]


POOL_WEIGHTS = [30, 10, 15, 10, 10, 20, 5]


@functools.cache
def id_pools(tokenizer: Any) -> list[list[int]]:
    vocab, single = vocab_of(tokenizer), list(single_bytes(tokenizer))
    high = single[0x80:]
    partial = [i for t, i in vocab.items() if any(ord(c) > 0x7F for c in t)]
    spaces = [i for t, i in vocab.items() if set(t) <= {"▁", "Ġ", " ", "Ċ"}]
    added = [int(i) for i in tokenizer.get_added_vocab().values()]
    size = len(tokenizer)
    return [high, single, partial or high, spaces, added, list(range(size)), [size]]


# --- the factory ----------------------------------------------------------------------------------


def test_old_names_still_importable() -> None:
    assert ReExported is IncrementalDetokenizer


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_factory_picks_the_stream_for_fast_tokenizers(tok: Any, skip: bool, spaces: bool) -> None:
    det = new_detokenizer(tok, skip, spaces)
    assert isinstance(det, FastDetokenizer)
    assert (det.skip, det.spaces) == (skip, spaces)


def test_factory_picks_the_stream_for_the_builtin_tokenizer() -> None:
    from hwlm import presets

    tokenizer = AutoTokenizer.from_pretrained(str(presets.TOKENIZER_DIR))
    assert isinstance(new_detokenizer(tokenizer), FastDetokenizer)
    check_exact(tokenizer, encode(tokenizer, "Hello, world! 😀 naïve"))


class OwnDecode(PreTrainedTokenizerFast):  # type: ignore[misc]
    """A fast tokenizer that post-processes its decode (as codegen's or whisper's do)."""

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return str(super()._decode(token_ids, skip_special_tokens, **kwargs)).upper()


class PlainTokenizer:
    """Not a transformers tokenizer at all: one character per id."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False, **kw: Any) -> str:
        return "".join(chr(i) for i in token_ids)


def test_factory_falls_back_where_the_stream_would_differ(byte_level: Any, llama: Any) -> None:
    own = OwnDecode(tokenizer_object=byte_level.backend_tokenizer)
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()  # its cleanup rewrites earlier text
    # Stripping two leading spaces: a window that starts with one strips the next token's too.
    strip_two = Tokenizer.from_str(llama.backend_tokenizer.to_str())
    strip_two.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 2, 0)])
    cases = [own, PlainTokenizer()]
    cases += [PreTrainedTokenizerFast(tokenizer_object=t) for t in (wordpiece, strip_two)]
    for tokenizer in cases:
        det = new_detokenizer(tokenizer)
        assert isinstance(det, IncrementalDetokenizer), type(tokenizer)
    det = new_detokenizer(own)
    ids = encode(byte_level, "hello there")
    assert "".join(det.add(t) for t in ids) + det.finish() == "HELLO THERE"


def test_factory_falls_back_when_decode_cleans_up_spaces(byte_level: Any) -> None:
    """clean_up_tokenization_spaces rewrites " ." after the fact: fast path only where the
    tokenizer's decode does not actually apply it."""
    folder = byte_level.name_or_path
    ids = encode(byte_level, "Hello , world . It 's fine !")
    for force in (False, True):
        tokenizer = AutoTokenizer.from_pretrained(
            folder,
            clean_up_tokenization_spaces=True,
            clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=force,
        )
        cleans = tokenizer.decode(ids) != byte_level.decode(ids)
        det = new_detokenizer(tokenizer)
        assert isinstance(det, IncrementalDetokenizer) == cleans, force
        if not cleans:
            check_exact(tokenizer, ids)


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_text_streams_exactly(tok: Any, text: str, skip: bool) -> None:
    check_exact(tok, encode(tok, text), skip)


@pytest.mark.parametrize("char", ["é", "中", "😀", "🎉"])
def test_a_character_split_across_byte_pieces_comes_out_whole(tok: Any, char: str) -> None:
    data = char.encode()
    ids = encode(tok, "ab") + byte_ids(tok, data) + encode(tok, "cd")
    pieces, rest = check_exact(tok, ids)
    assert rest == ""
    assert all(REPLACEMENT not in piece for piece in pieces)
    assert char in "".join(pieces)
    held = pieces[len(ids) - 2 - len(data) : len(ids) - 3]  # all the bytes but the last
    assert held == [""] * (len(data) - 1)


def test_byte_fallback_emits_a_character_once_its_run_ends(llama: Any) -> None:
    """A run of <0x..> pieces decodes as a whole (an invalid byte anywhere turns all of it into
    U+FFFD), so its text comes with the token after it."""
    ids = byte_ids(llama, "中".encode()) + encode(llama, "a")
    pieces, _ = check_exact(llama, ids)
    assert pieces[:3] == ["", "", ""] and pieces[3] == decode_tokens(llama, ids, True) == "中 a"


INVALID_RUNS = [
    b"\xe4\xb8",  # incomplete at the end
    b"\xe4\xb8\xad\xad",  # a whole character, then a stray continuation byte
    b"\x80",
    b"\xf0\x9f\x98",
    b"\xff\xfe",
    b"\xc3\xa9\xe4",
    b"\xed\xa0\x80",  # a UTF-16 surrogate
]


@pytest.mark.parametrize("run", INVALID_RUNS)
@pytest.mark.parametrize("then", ["", "x", "eos"])
def test_invalid_byte_runs_decode_as_the_tokenizer_does(tok: Any, run: bytes, then: str) -> None:
    tail = [special(tok, "eos")] if then == "eos" else encode(tok, then)
    for skip in (True, False):
        ids = encode(tok, "a") + byte_ids(tok, run) + tail
        check_exact(tok, ids, skip)


def test_incomplete_end_is_held_until_finish(tok: Any) -> None:
    ids = encode(tok, "hi") + byte_ids(tok, b"\xe4\xb8")
    det = new_detokenizer(tok)
    feed(det, tok, ids)
    ref = decode_tokens(tok, ids, True)
    assert ref.endswith(REPLACEMENT) and REPLACEMENT not in det.text
    assert det.final_text == ref
    rest = det.finish()
    assert det.text == ref and rest.startswith(REPLACEMENT)
    assert det.finish() == ""
    with pytest.raises(RuntimeError):
        det.add(ids[0])


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_special_and_added_tokens(tok: Any, skip: bool, spaces: bool) -> None:
    bos, eos, turn = special(tok, "bos"), special(tok, "eos"), special(tok, "turn")
    tool = int(tok.convert_tokens_to_ids("<tool>"))
    sequences = [
        [bos, *encode(tok, "Hello there"), turn, eos],
        [eos, eos, *encode(tok, " after specials")],
        [*encode(tok, "a"), tool, *encode(tok, " b"), tool, tool],
        [tool, *encode(tok, "x"), turn, *encode(tok, " y")],
        [*byte_ids(tok, "中".encode())[:2], eos, *byte_ids(tok, "中".encode())[2:], eos],
        [*byte_ids(tok, "中".encode()), eos, *byte_ids(tok, b"\xad"), *encode(tok, "z")],
        [*byte_ids(tok, "é".encode()), tool, *byte_ids(tok, b"\xa9")],
        [turn],
        [],
    ]
    for ids in sequences:
        check_exact(tok, ids, skip, spaces)


@pytest.mark.parametrize("skip", [True, False])
def test_leading_space_of_the_first_piece(tok: Any, skip: bool) -> None:
    """Metaspace: the "▁" of the first piece is dropped by Strip (Llama) but not without it
    (Gemma); the window a stream decodes must not drop any other."""
    vocab = tok.get_vocab()
    space = vocab.get("▁", vocab.get("Ġ"))
    bos, eos = special(tok, "bos"), special(tok, "eos")
    word = encode(tok, " the")
    for ids in (
        word,
        [bos, *word],
        [space, *word],
        [space, space, eos, *word, eos, space, *word],
        [eos, space, eos, space],
        [*word, eos, *word, eos, eos, *word],
    ):
        check_exact(tok, ids, skip)


@pytest.mark.parametrize("seed", range(3))
def test_random_sequences(tok: Any, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(NUM_RANDOM // 3):
        ids = random_ids(tok, rng, rng.randint(1, 30))
        check_exact(tok, ids, skip=rng.random() < 0.5, spaces=rng.random() < 0.7)


# --- copy -----------------------------------------------------------------------------------


def test_copy_mid_sequence(tok: Any, copy_mode: str) -> None:
    """A fork continues independently of its original, both exact, wherever it happens: inside
    a character, inside a byte run, after held text."""
    rng = random.Random(7)
    for _ in range(60):
        ids = random_ids(tok, rng, rng.randint(0, 20))
        skip = rng.random() < 0.5
        det = new_detokenizer(tok, skip)
        feed(det, tok, ids)
        twin = det.copy()
        assert twin.token_ids == det.token_ids and twin.text == det.text
        mine, theirs = random_ids(tok, rng, 12), random_ids(tok, rng, 12)
        for a, b in zip(mine, theirs, strict=True):  # interleaved: no shared state
            feed(det, tok, [a])
            feed(twin, tok, [b])
        assert det.final_text == decode_tokens(tok, ids + mine, skip)
        assert twin.final_text == decode_tokens(tok, ids + theirs, skip)


def test_copy_inside_a_character(tok: Any, copy_mode: str) -> None:
    emoji = byte_ids(tok, "😀".encode())
    det = new_detokenizer(tok)
    feed(det, tok, encode(tok, "x") + emoji[:2])
    twin = det.copy()
    feed(det, tok, emoji[2:] + encode(tok, "y"))
    feed(twin, tok, byte_ids(tok, b"A") + encode(tok, "y"))  # invalidates the twin's character
    assert twin.finish() == "" and det.finish() == ""
    assert "😀" in det.text and "😀" not in twin.text and REPLACEMENT in twin.text
    assert twin.text == decode_tokens(tok, twin.token_ids, True)


def test_copy_of_a_finished_detokenizer(tok: Any, copy_mode: str) -> None:
    det = new_detokenizer(tok)
    feed(det, tok, encode(tok, "done") + byte_ids(tok, b"\xe4"))
    det.finish()
    twin = det.copy()
    assert twin.text == det.text
    with pytest.raises(RuntimeError):
        twin.add(0)


# --- failure of the stream -----------------------------------------------------------------------


class FailingStream:
    def step(self, tokenizer: Any, ids: Any) -> str | None:
        raise Exception("Invalid prefix encountered")


def test_a_failing_stream_falls_back_to_full_decodes(tok: Any) -> None:
    ids = encode(tok, "some text 😀 and more")
    det = new_detokenizer(tok)
    assert isinstance(det, FastDetokenizer)
    feed(det, tok, ids[:3])
    det._stream = FailingStream()  # type: ignore[assignment]
    feed(det, tok, ids[3:])
    assert det.text + det.finish() == decode_tokens(tok, ids, True)


# --- the old detokenizer keeps the same interface -------------------------------------------------


def test_incremental_detokenizer_final_text_and_finish(tok: Any) -> None:
    ids = encode(tok, "abc") + byte_ids(tok, b"\xe4\xb8")
    det = IncrementalDetokenizer(tok)
    pieces = [det.add(t) for t in ids]
    ref = decode_tokens(tok, ids, True)
    assert "".join(pieces) == det.text and det.final_text == ref
    assert det.text + det.finish() == ref == det.text
    twin = det.copy()
    assert twin.token_ids == det.token_ids and twin.token_ids is not det.token_ids


@pytest.mark.parametrize("seed", range(5))
def test_tail_reads_the_end_without_the_whole_text(tok: Any, seed: int) -> None:
    """``tail`` and ``text_length`` (what stop strings read each step) agree with ``text``
    while the emitted pieces are still unjoined."""
    rng = random.Random(seed)
    det = new_detokenizer(tok)
    emitted = ""
    for token_id in encode(tok, TEXTS[seed % len(TEXTS)] * 3) + random_ids(tok, rng, 40):
        emitted += det.add(token_id)
        for k in (0, 1, 2, 5, 13, 1000):
            assert det.tail(k) == (emitted[-k:] if k else ""), (k, emitted)
        assert det.text_length == len(emitted)
    assert det.text == emitted
