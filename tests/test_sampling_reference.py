"""Each sampling control against a float64 reference computed on fixed logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hwlm.sampling.sampler import Sampler, process_logits, sampling_probs
from hwlm.sampling.stop_checker import check_stop
from hwlm.sampling_params import SamplingParams
from tests import sampling_reference as ref
from tests.sampling_helpers import EOS, fixed_logits, make_seq

VOCAB = 40


def _check_processed(seqs, logits: torch.Tensor, expected: list[np.ndarray]) -> None:
    got = process_logits(logits.float(), seqs).double().numpy()
    for row, want in zip(got, expected, strict=True):
        assert np.array_equal(np.isinf(row), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(row[finite], want[finite], rtol=1e-5, atol=1e-5)
    greedy = Sampler()(logits.float(), seqs).token_ids
    assert greedy == [int(np.argmax(w)) for w in expected]


def test_allowed_token_ids() -> None:
    logits = fixed_logits(2, VOCAB)
    seqs = [
        make_seq(SamplingParams(temperature=0, allowed_token_ids=[3, 17, 29])),
        make_seq(SamplingParams(temperature=0)),  # unconstrained row in the same batch
    ]
    expected = [ref.allowed(logits[0].numpy(), [3, 17, 29]), logits[1].numpy()]
    _check_processed(seqs, logits, expected)


def test_bad_words_single_and_multi_token() -> None:
    logits = fixed_logits(3, VOCAB, seed=1)
    words = [[7], [11, 12, 13], [20, 21]]
    outputs = [[5, 11, 12], [5, 20], [11, 5]]  # completes word 2; completes word 3; neither
    seqs = [
        make_seq(SamplingParams(temperature=0, bad_words=["x"]), output=o, bad_words=words)
        for o in outputs
    ]
    expected = [ref.bad_words(logits[i].numpy(), words, outputs[i]) for i in range(3)]
    assert np.isinf(expected[0][13]) and np.isinf(expected[1][21]) and not np.isinf(expected[2][13])
    _check_processed(seqs, logits, expected)


def test_bad_word_prefix_is_not_matched_in_the_prompt() -> None:
    logits = fixed_logits(1, VOCAB, seed=2)
    words = [[11, 12]]
    seq = make_seq(SamplingParams(temperature=0), prompt=[1, 11], bad_words=words)
    _check_processed([seq], logits, [ref.bad_words(logits[0].numpy(), words, [])])


@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("num_output", [0, 2, 3, 5])
def test_min_tokens_masks_eos_and_stop_ids(num_output: int, ignore_eos: bool) -> None:
    logits = fixed_logits(1, VOCAB, seed=3)
    params = SamplingParams(
        temperature=0, min_tokens=3, stop_token_ids=[9, 10], ignore_eos=ignore_eos
    )
    seq = make_seq(params, output=[5] * num_output)
    expected = ref.min_tokens(logits[0].numpy(), [EOS, 9, 10], num_output, 3)
    _check_processed([seq], logits, [expected])


def test_ignore_eos_min_tokens_holds_eos_back_then_lets_it_through() -> None:
    """EOS is the argmax: with ignore_eos and min_tokens=k, no EOS among the first k tokens,
    EOS from then on, and it never stops the sequence (only max_tokens does)."""
    logits = fixed_logits(1, VOCAB, seed=5)
    logits[0, EOS] = logits.max() + 10.0
    k, n = 3, 6
    seq = make_seq(SamplingParams(temperature=0, min_tokens=k, max_tokens=n, ignore_eos=True))
    stopped = []
    for _ in range(n):
        token = Sampler()(logits.float(), [seq]).token_ids[0]
        seq.token_ids.append(token)
        stopped.append(check_stop(seq, token, "", max_model_len=1000))
    tokens = seq.token_ids[seq.num_prompt_tokens :]
    assert EOS not in tokens[:k]
    assert tokens[k:] == [EOS] * (n - k)
    assert stopped == [False] * (n - 1) + [True] and seq.finish_reason == "length"


def test_logit_bias() -> None:
    logits = fixed_logits(2, VOCAB, seed=4)
    bias = {3: 5.5, 8: -100.0, 39: 0.25}
    seqs = [
        make_seq(SamplingParams(temperature=0, logit_bias=bias)),
        make_seq(SamplingParams(temperature=0)),
    ]
    _check_processed(seqs, logits, [ref.logit_bias(logits[0].numpy(), bias), logits[1].numpy()])


@pytest.mark.parametrize(
    ("repetition", "frequency", "presence"),
    [(1.5, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.8, 0.0), (1.0, 0.0, -1.2), (1.3, -0.5, 1.1)],
)
def test_penalties(repetition: float, frequency: float, presence: float) -> None:
    logits = fixed_logits(3, VOCAB, seed=5)
    prompt, output = [1, 4, 4, 30], [4, 6, 6, 6, 33, 1]
    params = SamplingParams(
        temperature=0,
        repetition_penalty=repetition,
        frequency_penalty=frequency,
        presence_penalty=presence,
    )
    seqs = [
        make_seq(params, prompt=prompt, output=output),
        make_seq(SamplingParams(temperature=0), prompt=prompt, output=output),  # no penalty
        make_seq(params, prompt=[7], output=[]),  # penalty but no output yet
    ]
    expected = [
        ref.penalties(logits[0].numpy(), prompt, output, repetition, frequency, presence),
        logits[1].numpy(),
        ref.penalties(logits[2].numpy(), [7], [], repetition, frequency, presence),
    ]
    _check_processed(seqs, logits, expected)


def test_everything_in_vllm_order() -> None:
    logits = fixed_logits(1, VOCAB, seed=6)
    allowed = list(range(0, VOCAB, 2))
    words = [[6], [14, 16]]
    bias = {4: 3.0, 16: 2.0, 8: -1.0}
    prompt, output = [4, 8, 10], [14, 10, 10]
    params = SamplingParams(
        temperature=0,
        allowed_token_ids=allowed,
        min_tokens=5,
        logit_bias=bias,
        repetition_penalty=1.4,
        frequency_penalty=0.3,
        presence_penalty=0.2,
    )
    seq = make_seq(params, prompt=prompt, output=output, bad_words=words)
    row = logits[0].numpy()
    row = ref.allowed(row, allowed)
    row = ref.bad_words(row, words, output)
    row = ref.min_tokens(row, [EOS], len(output), 5)
    row = ref.logit_bias(row, bias)
    row = ref.penalties(row, prompt, output, 1.4, 0.3, 0.2)
    _check_processed([seq], logits, [row])


CASES = [
    dict(temperature=0.6),
    dict(temperature=1.3, min_p=0.2),
    dict(top_k=5),
    dict(top_k=1),
    dict(top_p=0.6),
    dict(top_p=0.05),
    dict(temperature=0.8, min_p=0.05, top_k=9, top_p=0.75),
    dict(top_k=500),  # larger than the vocabulary: no truncation
]


def test_truncated_distributions_match_reference() -> None:
    logits = fixed_logits(len(CASES), VOCAB, seed=7)
    params = [SamplingParams(**case) for case in CASES]
    got = sampling_probs(logits.float(), [make_seq(p) for p in params]).double().numpy()
    for i, p in enumerate(params):
        want = ref.distribution(logits[i].numpy(), p.temperature, p.min_p, p.top_k, p.top_p)
        np.testing.assert_allclose(got[i], want, atol=2e-6, err_msg=str(CASES[i]))


def test_greedy_is_argmax() -> None:
    logits = fixed_logits(4, VOCAB, seed=8)
    out = Sampler()(logits.float(), [make_seq(SamplingParams(temperature=0)) for _ in range(4)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("n", [0, 1, 5, -1])
def test_logprobs_top_n_plus_sampled_with_ranks(n: int) -> None:
    logits = fixed_logits(2, VOCAB, seed=9)
    seqs = [
        make_seq(SamplingParams(temperature=1.0, logprobs=n, seed=1)),
        make_seq(SamplingParams(temperature=0, logprobs=n, logit_bias={5: 100.0})),
    ]
    out = Sampler()(logits.float(), seqs)
    assert out.token_ids[1] == 5  # the bias changes the choice, not the reported logprobs
    for i in range(2):
        lp = ref.log_softmax(logits[i].numpy())
        order = np.argsort(-lp, kind="stable")
        ids, values, rank = out.top_logprobs[i]
        count = VOCAB if n == -1 else n
        assert ids == order[:count].tolist()
        np.testing.assert_allclose(values, lp[order[:count]], atol=1e-5)
        token = out.token_ids[i]
        assert rank == int((lp > lp[token]).sum()) + 1
        assert out.logprobs[i] == pytest.approx(lp[token], abs=1e-5)


def test_no_logprobs_requested() -> None:
    out = Sampler()(fixed_logits(1, VOCAB).float(), [make_seq(SamplingParams())])
    assert out.top_logprobs == [None]


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked: decided in the prefilter; flat: sorted
def test_top_p_over_a_large_vocabulary(scale: float) -> None:
    from hwlm.sampling.truncation import _prefiltered_nucleus

    vocab = 3000
    cases = [dict(top_p=0.9), dict(top_p=0.5, temperature=0.7), dict(top_k=20, top_p=0.8)]
    logits = fixed_logits(len(cases), vocab, seed=10, scale=scale)
    params = [SamplingParams(**case) for case in cases]
    got = sampling_probs(logits.float(), [make_seq(p) for p in params]).double().numpy()
    for i, p in enumerate(params):
        want = ref.distribution(logits[i].numpy(), p.temperature, p.min_p, p.top_k, p.top_p)
        np.testing.assert_allclose(got[i], want, atol=2e-6, err_msg=str(cases[i]))
    scaled = logits.float() / torch.tensor([[p.temperature] for p in params])
    decided = _prefiltered_nucleus(scaled, [p.top_k or vocab for p in params], [0.9, 0.5, 0.8])
    assert (decided is not None) == (scale > 1)


def test_an_untruncated_row_beside_top_p_rows() -> None:
    vocab = 3000
    logits = fixed_logits(2, vocab, seed=11, scale=8.0)
    params = [SamplingParams(top_p=0.9), SamplingParams(temperature=0.9)]
    got = sampling_probs(logits.float(), [make_seq(p) for p in params]).double().numpy()
    for i, p in enumerate(params):
        want = ref.distribution(logits[i].numpy(), p.temperature, p.min_p, p.top_k, p.top_p)
        np.testing.assert_allclose(got[i], want, atol=2e-6)
