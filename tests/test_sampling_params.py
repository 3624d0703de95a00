"""SamplingParams validation: every out-of-range value is a ValueError naming the parameter and its
allowed range; vLLM's normalisations; the generation_config.json defaults reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hwlm.sampling.generation_config import load_sampling_defaults
from hwlm.sampling_params import SamplingParams

# (field, bad value, the range the message must state)
OUT_OF_RANGE = [
    ("n", 0, "at least 1"),
    ("n", -3, "at least 1"),
    ("best_of", 1, "at least n=2"),  # with n=2 below
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("frequency_penalty", 3.0, "[-2, 2]"),
    ("frequency_penalty", -7.0, "[-2, 2]"),
    ("repetition_penalty", 0.0, "greater than 0"),
    ("repetition_penalty", -1.0, "greater than 0"),
    ("repetition_penalty", float("inf"), "finite"),
    ("temperature", -0.1, "non-negative"),
    ("temperature", float("nan"), "finite"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("top_k", -2, "0 or -1 (disable), or at least 1"),
    ("min_p", -0.1, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("seed", 2**64, "seed must be in ["),
    ("max_tokens", 0, "at least 1"),
    ("min_tokens", -1, "non-negative"),
    ("min_tokens", 17, "[0, max_tokens=16]"),
    ("logprobs", -2, "non-negative, or -1"),
    ("prompt_logprobs", -5, "non-negative, or -1"),
    ("stop", [""], "empty string"),
    ("stop_token_ids", [-1], "non-negative"),
    ("bad_words", [""], "non-empty"),
    ("logit_bias", {3: 100.5}, "[-100, 100]"),
    ("logit_bias", {3: -250.0}, "[-100, 100]"),
    ("logit_bias", {-1: 1.0}, "non-negative"),
    ("allowed_token_ids", [], "must not be empty"),
    ("allowed_token_ids", [-4], "non-negative"),
]


@pytest.mark.parametrize(("field", "value", "range_text"), OUT_OF_RANGE)
def test_out_of_range_names_parameter_and_range(field: str, value: object, range_text: str) -> None:
    kwargs: dict[str, object] = {field: value}
    if field == "best_of":
        kwargs["n"] = 2
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert range_text in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(temperature=0.0, n=2), "n must be 1 when using greedy"),
        (dict(temperature=0.0, best_of=3), "best_of must be 1 when using greedy"),
        (dict(stop="x", detokenize=False), "detokenize"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(logit_bias={"a": 1.0}), "logit_bias must map integer token ids"),
    ],
)
def test_other_invalid_combinations(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(name)):
        SamplingParams(**kwargs)


def test_in_range_edges_are_accepted() -> None:
    SamplingParams(
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=1e-3,
        top_p=1.0,
        top_k=-1,
        min_p=1.0,
        min_tokens=16,
        logprobs=-1,
        prompt_logprobs=0,
        logit_bias={0: -100.0, 1: 100.0},
    )


def test_normalisation_like_vllm() -> None:
    p = SamplingParams(stop="END", seed=-1, top_k=-1, logit_bias={"7": 1}, stop_token_ids=[5, 5])
    assert p.stop == ["END"] and p.seed is None and p.top_k == 0
    assert p.logit_bias == {7: 1.0} and p.stop_token_ids == [5]
    assert p.best_of == 1
    assert SamplingParams(n=3).best_of == 3
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=4, min_p=0.3)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=0.001).temperature == pytest.approx(0.01)
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    assert (
        SamplingParams(stop=["ab"], include_stop_str_in_output=True).output_text_buffer_length == 0
    )


def test_generation_config_defaults(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.9,
                "top_k": 20,
                "repetition_penalty": 1.05,
                "max_new_tokens": 64,
                "eos_token_id": [1, 2],
                "min_p": None,
            }
        )
    )
    defaults = load_sampling_defaults(tmp_path)
    assert defaults == dict(
        temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05, max_tokens=64
    )
    assert load_sampling_defaults(tmp_path / "missing") == {}
    assert load_sampling_defaults(None) == {}
