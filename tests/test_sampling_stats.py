"""Statistical tests of the sampler (deterministic: seeded), and per-request seed reproducibility
whatever else is in the batch."""

from __future__ import annotations

import pytest
import torch

from hwlm.sampling.sampler import Sampler
from hwlm.sampling_params import SamplingParams
from tests import sampling_reference as ref
from tests.sampling_helpers import fixed_logits, make_seq

VOCAB = 24
DRAWS = 40_000
P_MIN = 1e-3  # reject when a correct sampler would give a statistic this extreme 1 time in 1000


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = probs > 0
    stat = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    df = int(keep.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def _draw(params: SamplingParams, logits: torch.Tensor, torch_seed: int) -> torch.Tensor:
    """DRAWS samples from one row: the same sequence repeated over a batch (a seeded request's
    generator then yields fresh noise for every row)."""
    torch.manual_seed(torch_seed)
    seq = make_seq(params)
    out = Sampler()(logits.float().expand(DRAWS, -1), [seq] * DRAWS)
    return torch.bincount(torch.tensor(out.token_ids), minlength=VOCAB).double()


CASES = [
    dict(top_k=6),
    dict(top_p=0.7),
    dict(min_p=0.15),
    dict(temperature=0.7, top_k=10, top_p=0.85, min_p=0.02),
    dict(temperature=1.5),
    dict(top_k=6, seed=11),  # the seeded path draws its own noise
    dict(top_p=0.8, seed=12),
]


@pytest.mark.parametrize(("index", "case"), enumerate(CASES), ids=[str(c) for c in CASES])
def test_frequencies_match_the_renormalised_distribution(index: int, case: dict) -> None:
    params = SamplingParams(**case)
    row = fixed_logits(1, VOCAB, seed=21, scale=1.5)[0]
    probs = ref.distribution(
        row.numpy(), params.temperature, params.min_p, params.top_k, params.top_p
    )
    probs_t = torch.from_numpy(probs)
    counts = _draw(params, row, torch_seed=100 + index)  # its own stream per case
    assert counts[probs_t == 0].sum() == 0, "a masked token was emitted"
    assert (probs_t > 0).sum() > 1  # the case really is random
    assert _chi_square_p_value(counts, probs_t) > P_MIN


def test_chi_square_rejects_a_wrong_distribution() -> None:
    """The test above has power: untruncated sampling fails the top_k=6 expectation."""
    row = fixed_logits(1, VOCAB, seed=21, scale=1.5)[0]
    counts = _draw(SamplingParams(temperature=1.0), row, torch_seed=5)
    wrong = ref.distribution(row.numpy(), 1.0, 0.0, 0, 1.0) * 0.9
    wrong[0] += 0.1
    assert _chi_square_p_value(counts, torch.from_numpy(wrong)) < P_MIN


def _run_steps(seqs: list, target: int, steps: list[torch.Tensor]) -> list[int]:
    """Sample several steps for a batch; return the tokens of row ``target``."""
    sampler = Sampler()
    tokens = []
    for logits in steps:
        batch_logits = logits.float().expand(len(seqs), -1).clone()
        out = sampler(batch_logits, seqs)
        for seq, token in zip(seqs, out.token_ids, strict=True):
            seq.token_ids.append(token)
        tokens.append(out.token_ids[target])
    return tokens


def test_seed_reproducible_whatever_the_batch() -> None:
    steps = [fixed_logits(1, 200, seed=s, scale=0.5)[0] for s in range(12)]
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    torch.manual_seed(0)
    alone = _run_steps([make_seq(params)], 0, steps)
    others = [
        make_seq(SamplingParams(temperature=0.9)),
        make_seq(SamplingParams(temperature=0)),
        make_seq(SamplingParams(top_k=3, seed=99)),
        make_seq(SamplingParams(top_p=0.5, repetition_penalty=1.2)),
    ]
    for position, torch_seed in ((0, 1), (2, 2), (4, 3)):
        torch.manual_seed(torch_seed)  # the unseeded rows' randomness differs every time
        batch = [*others[:position], make_seq(params), *others[position:]]
        assert _run_steps(batch, position, steps) == alone
    torch.manual_seed(0)
    other_seed = _run_steps([make_seq(SamplingParams(**{**vars(params), "seed": 4321}))], 0, steps)
    assert other_seed != alone  # the seed matters


def test_prefiltered_top_p_frequencies() -> None:
    vocab = 600
    row = fixed_logits(1, vocab, seed=22, scale=4.0)[0]
    params = SamplingParams(top_p=0.8)
    probs = torch.from_numpy(ref.distribution(row.numpy(), 1.0, 0.0, 0, 0.8))
    assert 1 < int((probs > 0).sum()) < 256  # the nucleus fits the prefilter
    torch.manual_seed(7)
    seq = make_seq(params)
    out = Sampler()(row.float().expand(DRAWS, -1), [seq] * DRAWS)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=vocab).double()
    assert counts[probs == 0].sum() == 0
    assert _chi_square_p_value(counts, probs) > P_MIN


def test_seeded_draw_same_whether_candidates_are_few_or_the_vocabulary() -> None:
    """Beside an untruncated row the batch samples over the dense vocabulary; alone, the seeded
    top-p row samples over its prefiltered candidates. Same tokens either way."""
    vocab = 2000
    steps = [fixed_logits(1, vocab, seed=30 + s, scale=3.0)[0] for s in range(20)]
    params = SamplingParams(top_p=0.9, seed=77)
    alone = _run_steps([make_seq(params)], 0, steps)
    torch.manual_seed(1)
    beside = _run_steps([make_seq(SamplingParams(temperature=1.0)), make_seq(params)], 1, steps)
    assert beside == alone
