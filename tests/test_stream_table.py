"""StreamTable keeps the total of its streams' sequences through every way a stream leaves."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hwlm.engine.stream_table import StreamTable, num_samples
from hwlm.sampling_params import SamplingParams


@dataclass
class _Stream:
    num_seqs: int


def test_total_follows_set_pop_del_and_clear() -> None:
    table: StreamTable[_Stream] = StreamTable()
    table["a"], table["b"], table["c"] = _Stream(3), _Stream(1), _Stream(16)
    assert table.num_seqs == 20
    table["a"] = _Stream(2)  # replaced
    assert table.num_seqs == 19
    assert table.pop("b").num_seqs == 1 and table.num_seqs == 18
    assert table.pop("b", None) is None and table.num_seqs == 18
    with pytest.raises(KeyError):
        table.pop("b")
    del table["c"]
    assert table.num_seqs == 2 == sum(s.num_seqs for s in table.values())
    table.clear()
    assert table.num_seqs == 0 and not table


def test_num_samples_is_best_of_at_least_n() -> None:
    assert num_samples(SamplingParams()) == 1
    assert num_samples(SamplingParams(n=4, temperature=1.0)) == 4
    assert num_samples(SamplingParams(n=2, best_of=5, temperature=1.0)) == 5
