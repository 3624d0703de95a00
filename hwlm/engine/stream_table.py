"""The streams a client tracks, by request id, with the total of their sequences kept as they
come and go: admission control reads that total on every request, so it must not be a sum."""

from __future__ import annotations

from typing import Protocol, TypeVar, overload

from hwlm.sampling_params import SamplingParams


class HasSequences(Protocol):
    num_seqs: int  # the sequences the request runs: max(n, best_of)


S = TypeVar("S", bound=HasSequences)
_MISSING = object()


def num_samples(params: SamplingParams) -> int:
    """The sequences one prompt runs: ``best_of`` samples, at least ``n``."""
    return max(params.n, params.best_of or 1)


class StreamTable(dict[str, S]):
    """A dict of streams whose ``num_seqs`` is the sum of its values' ``num_seqs``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_seqs = 0

    def __setitem__(self, key: str, value: S) -> None:
        old = super().get(key)
        if old is not None:
            self.num_seqs -= old.num_seqs
        super().__setitem__(key, value)
        self.num_seqs += value.num_seqs

    def __delitem__(self, key: str) -> None:
        self.num_seqs -= self[key].num_seqs
        super().__delitem__(key)

    @overload  # type: ignore[override]
    def pop(self, key: str) -> S: ...
    @overload
    def pop(self, key: str, default: None) -> S | None: ...
    def pop(self, key: str, default: object = _MISSING) -> S | None:
        if key in self:
            value = super().pop(key)
            self.num_seqs -= value.num_seqs
            return value
        if default is _MISSING:
            raise KeyError(key)
        return None

    def clear(self) -> None:
        super().clear()
        self.num_seqs = 0
