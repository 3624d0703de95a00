"""Incremental detokenization: the text of a growing list of token ids, piece by piece.

The contract, for every implementation and every token sequence ``ids``::

    pieces = [det.add(t) for t in ids]
    "".join(pieces) == det.text              # text is what has been emitted
    det.final_text == decode_tokens(tokenizer, ids, skip, spaces)   # byte for byte
    "".join(pieces) + det.finish() == det.text == det.final_text

``add`` returns only completed text: an incomplete trailing UTF-8 character (byte-level pieces,
``<0x..>`` byte-fallback pieces) is held until a later token completes it, so no piece ever ends
with half a character (U+FFFD stands only where the full decode has one too). Held text is part
of ``final_text`` at once; ``finish()`` (at the end of a sequence) emits it and closes the
detokenizer. ``copy()`` gives an independent twin for a forked sequence.

``new_detokenizer`` picks the implementation: ``FastDetokenizer`` (the ``tokenizers`` library's
``DecodeStream``, under a microsecond a token) for fast tokenizers whose ``decode`` it reproduces
exactly, else ``IncrementalDetokenizer`` (two ``decode`` calls of a short window per token).
"""

from __future__ import annotations

import copy
import json
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what a decode shows for bytes that are not (yet) a whole character

# Decoders whose output DecodeStream follows exactly: each maps tokens to text without looking
# at later tokens, except ByteFallback (handled by holding a run of byte pieces, see
# FastDetokenizer) and Strip (exact only for at most one leading character, none trailing).
_SAFE_DECODERS = frozenset({"ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"})
# Text that transformers' clean_up_tokenization would change (" ." -> "." and the like).
_CLEANUP_PROBE = "a . b , c ! d ? e ' f n't g 'm h 's i 've j 're k"


def decode_tokens(
    tokenizer: Any,
    token_ids: list[int],
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool = True,
) -> str:
    """``tokenizer.decode`` of all of ``token_ids``: the reference every detokenizer matches."""
    if spaces_between_special_tokens:
        text: str = tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text
    text = tokenizer.decode(
        token_ids, skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=False
    )
    return text


class Detokenizer(Protocol):
    """What the engine needs of a detokenizer (see the module docstring for the contract)."""

    token_ids: list[int]

    @property
    def text(self) -> str:
        """All text emitted so far (``"".join`` of the pieces ``add`` returned)."""
        ...

    @property
    def final_text(self) -> str:
        """The full decode of ``token_ids``, held text included."""
        ...

    @property
    def text_length(self) -> int:
        """``len(text)``, without building ``text``."""
        ...

    def tail(self, num_chars: int) -> str:
        """The last ``num_chars`` characters of ``text`` (all of it if shorter), without building
        ``text``: what a stop-string check reads each step."""
        ...

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completed (possibly "")."""
        ...

    def finish(self) -> str:
        """Emit the held text (end of the sequence); no token may be added afterwards."""
        ...

    def copy(self) -> Detokenizer:
        """An independent twin (for a forked sequence)."""
        ...


def new_detokenizer(
    tokenizer: Any,
    skip_special_tokens: bool = True,
    spaces_between_special_tokens: bool = True,
) -> Detokenizer:
    """The fastest detokenizer that is exact for ``tokenizer``: ``FastDetokenizer`` for a fast
    (``tokenizers``-backed) tokenizer whose ``decode`` it reproduces, else
    ``IncrementalDetokenizer``. ``spaces_between_special_tokens`` only matters to slow tokenizers
    (a fast tokenizer's ``decode`` ignores it), so it does not change the choice."""
    plan = stream_plan(tokenizer)
    if plan is None:
        return IncrementalDetokenizer(tokenizer, skip_special_tokens, spaces_between_special_tokens)
    return FastDetokenizer(tokenizer, plan, skip_special_tokens, spaces_between_special_tokens)


class IncrementalDetokenizer:
    """Text of a growing token list, emitted piece by piece without re-decoding everything.

    Decodes a short window (from ``prefix_offset``) so that byte-level tokens that only form a
    character together are emitted once complete (a trailing U+FFFD means: wait). Works with any
    tokenizer that has ``decode``; about two ``decode`` calls per token."""

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.spaces = spaces_between_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.finished = False

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        _check_open(self.finished)
        self.token_ids.append(token_id)
        window = self.token_ids[self.prefix_offset : self.read_offset]
        prefix = decode_tokens(self.tokenizer, window, self.skip, self.spaces)
        full = decode_tokens(
            self.tokenizer, self.token_ids[self.prefix_offset :], self.skip, self.spaces
        )
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta

    @property
    def final_text(self) -> str:
        """The full decode of ``token_ids``, held text included."""
        if self.finished or self.read_offset == len(self.token_ids):
            return self.text
        return decode_tokens(self.tokenizer, self.token_ids, self.skip, self.spaces)

    @property
    def text_length(self) -> int:
        return len(self.text)

    def tail(self, num_chars: int) -> str:
        return self.text[-num_chars:] if num_chars > 0 else ""

    def finish(self) -> str:
        """Emit the held text (end of the sequence); no token may be added afterwards."""
        rest, self.text = _rest(self.text, self.final_text)
        self.finished = True
        return rest

    def copy(self) -> IncrementalDetokenizer:
        """An independent twin sharing the tokenizer (for a forked sequence)."""
        twin = copy.copy(self)
        twin.token_ids = list(self.token_ids)
        return twin


@dataclass(frozen=True)
class StreamPlan:
    """What ``FastDetokenizer`` needs to know of a tokenizer, worked out once per tokenizer.

    ``byte_ids``: the ``<0x..>`` pieces when the decoder has ByteFallback (else empty); a run of
    them decodes as a whole (one invalid byte turns the run into U+FFFDs), so it is held until a
    visible token ends it. ``special_ids``: the special tokens (skipped when asked to)."""

    backend: Tokenizer
    byte_ids: frozenset[int]
    special_ids: frozenset[int]


class FastDetokenizer:
    """Incremental detokenization with the ``tokenizers`` library's ``DecodeStream``.

    Exact (the module's contract) for the tokenizers ``stream_plan`` accepts. One ``step`` of the
    stream (in Rust) per token; a run of byte-fallback pieces is stepped as one list together with
    the token that ends it, since a later byte could still invalidate the whole run."""

    def __init__(
        self,
        tokenizer: Any,
        plan: StreamPlan,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.plan = plan
        self.skip = skip_special_tokens
        self.spaces = spaces_between_special_tokens
        self.token_ids: list[int] = []
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []  # an open run of byte-fallback pieces, not yet stepped
        self._pieces: list[str] = []  # the emitted text, joined lazily by ``text``
        self._length = 0  # characters in the pieces
        self._held = False  # whether the emitted text may lag the full decode
        self.finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def final_text(self) -> str:
        """The full decode of ``token_ids``, held text included."""
        if not self._held:
            return self.text
        return decode_tokens(self.tokenizer, self.token_ids, self.skip, self.spaces)

    @property
    def text_length(self) -> int:
        return self._length

    def tail(self, num_chars: int) -> str:
        if num_chars <= 0:
            return ""
        parts: list[str] = []
        have = 0
        for piece in reversed(self._pieces):  # the newest pieces, back to num_chars
            parts.append(piece)
            have += len(piece)
            if have >= num_chars:
                break
        return "".join(reversed(parts))[-num_chars:]

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        _check_open(self.finished)
        self.token_ids.append(token_id)
        if self._stream is None:
            return self._add_by_decoding()
        if self._extends_run(token_id):
            self._pending.append(token_id)
            self._held = True
            return ""
        if self._pending:
            ids: int | list[int] = [*self._pending, token_id]
            self._pending = []
        else:
            ids = token_id
        return self._step(ids)

    def finish(self) -> str:
        """Emit the held text (end of the sequence); no token may be added afterwards."""
        rest, text = _rest(self.text, self.final_text)
        self._pieces, self._held, self.finished = [text], False, True
        self._length = len(text)
        return rest

    def copy(self) -> FastDetokenizer:
        """An independent twin (for a forked sequence): the stream's own copy where the library
        has one, else a fresh detokenizer that replays the tokens."""
        if not _STREAM_COPIES:
            return self._replayed()
        twin = copy.copy(self)
        twin.token_ids = list(self.token_ids)
        twin._pending = list(self._pending)
        twin._pieces = [self.text]
        twin._stream = copy.copy(self._stream)
        return twin

    def _extends_run(self, token_id: int) -> bool:
        """Whether ``token_id`` continues an open run of byte pieces (or starts one)."""
        if token_id in self.plan.byte_ids:
            return True
        if not self._pending:
            return False
        skipped = self.skip and token_id in self.plan.special_ids
        return skipped or self.plan.backend.id_to_token(token_id) is None  # decoded as nothing

    def _step(self, ids: int | list[int]) -> str:
        assert self._stream is not None
        try:
            piece = self._stream.step(self.plan.backend, ids)
        except Exception as exc:  # the library found the text changed retroactively
            logger.warning("DecodeStream failed (%s); decoding this sequence in full instead", exc)
            self._stream = None
            return self._add_by_decoding()
        self._held = piece is None
        if piece is None:
            return ""
        self._pieces.append(piece)
        self._length += len(piece)
        return piece

    def _add_by_decoding(self) -> str:
        """The slow, safe way (only after the stream failed): decode all the tokens."""
        full = decode_tokens(self.tokenizer, self.token_ids, self.skip, self.spaces)
        text = self.text
        self._held = True
        if len(full) <= len(text) or full.endswith(REPLACEMENT) or not full.startswith(text):
            return ""
        self._held = False
        piece = full[len(text) :]
        self._pieces.append(piece)
        self._length += len(piece)
        return piece

    def _replayed(self) -> FastDetokenizer:
        twin = FastDetokenizer(self.tokenizer, self.plan, self.skip, self.spaces)
        for token_id in self.token_ids:
            twin.add(token_id)
        if self.finished:
            twin.finish()
        return twin


def _check_open(finished: bool) -> None:
    if finished:
        raise RuntimeError("this detokenizer is finished: no token can be added")


def _rest(text: str, final: str) -> tuple[str, str]:
    """The held rest of ``final`` after the emitted ``text``, and the text to keep."""
    if final.startswith(text):
        return final[len(text) :], final
    logger.error("emitted text %r is not a prefix of the full decode %r", text[-20:], final[-20:])
    return "", final


# --- choosing the implementation -------------------------------------------------------------


def _stream_copies() -> bool:
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return False
    return hasattr(DecodeStream, "__copy__")


_STREAM_COPIES = _stream_copies()  # whether DecodeStream can copy itself (else copy() replays)
_PLANS: weakref.WeakKeyDictionary[Any, StreamPlan | None] = weakref.WeakKeyDictionary()


def stream_plan(tokenizer: Any) -> StreamPlan | None:
    """What ``FastDetokenizer`` needs for ``tokenizer``, or None where it would not be exact;
    worked out once per tokenizer object."""
    try:
        return _PLANS[tokenizer]
    except (KeyError, TypeError):
        pass
    reason = _unsupported(tokenizer)
    plan = None if reason else _make_plan(tokenizer.backend_tokenizer)
    if reason:
        logger.info("incremental detokenization without DecodeStream: %s", reason)
    try:
        _PLANS[tokenizer] = plan
    except TypeError:  # neither hashable nor weakly referenceable: work it out every time
        pass
    return plan


def _unsupported(tokenizer: Any) -> str | None:
    """Why ``DecodeStream`` would not reproduce ``tokenizer.decode`` exactly (None: it would)."""
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
    except ImportError as exc:
        return f"missing library ({exc})"
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return f"{type(tokenizer).__name__} is no fast tokenizer"
    kind = type(tokenizer)
    if kind.decode is not PreTrainedTokenizerBase.decode or (
        kind._decode is not PreTrainedTokenizerFast._decode
    ):
        return f"{kind.__name__} decodes its own way"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return "no tokenizers.Tokenizer backend"
    if not _steps_lists(DecodeStream, backend):
        return "this tokenizers version's DecodeStream cannot step a list of ids"
    if not _decoder_kinds(backend) or not _safe_decoder(_decoder_spec(backend)):
        return "its decoder is not one DecodeStream follows exactly"
    if _cleans_up(tokenizer, backend):
        return "its decode cleans up tokenization spaces"
    return None


def _steps_lists(stream_type: type[DecodeStream], backend: Tokenizer) -> bool:
    try:
        stream_type(skip_special_tokens=False).step(backend, [])
    except Exception:
        return False
    return True


def _decoder_spec(backend: Tokenizer) -> dict[str, Any]:
    """The backend's decoder as its JSON description ({} without one)."""
    if backend.decoder is None:
        return {}
    spec: dict[str, Any] = json.loads(backend.decoder.__getstate__())
    return spec


def _decoder_kinds(backend: Tokenizer) -> set[str]:
    """The types of the backend's decoders, those inside a Sequence included."""
    kinds: set[str] = set()
    todo = [_decoder_spec(backend)]
    while todo:
        spec = todo.pop()
        kinds.add(str(spec.get("type")))
        todo.extend(spec.get("decoders", []))
    return kinds - {"None"}


def _safe_decoder(spec: dict[str, Any]) -> bool:
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_safe_decoder(part) for part in spec.get("decoders", []))
    if kind == "Strip":
        return int(spec.get("start", 0)) <= 1 and int(spec.get("stop", 0)) == 0
    return kind in _SAFE_DECODERS


def _cleans_up(tokenizer: Any, backend: Tokenizer) -> bool:
    """Whether ``tokenizer.decode`` post-processes the backend's text (clean_up_tokenization):
    tried on a text it would change, as transformers versions differ in when they do it."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    ids = backend.encode(_CLEANUP_PROBE, add_special_tokens=False).ids
    return bool(tokenizer.decode(ids) != backend.decode(ids, skip_special_tokens=False))


def _make_plan(backend: Tokenizer) -> StreamPlan:
    added = backend.get_added_tokens_decoder()
    special_ids = frozenset(i for i, token in added.items() if token.special)
    byte_ids: frozenset[int] = frozenset()
    if "ByteFallback" in _decoder_kinds(backend):
        names = [f"<0x{b:02X}>" for b in range(256)] + [f"<0x{b:02x}>" for b in range(256)]
        byte_ids = frozenset(i for i in map(backend.token_to_id, names) if i is not None)
    return StreamPlan(backend, byte_ids, special_ids)
