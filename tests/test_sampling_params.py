"""SamplingParams validation: every out-of-range value is a ValueError naming the parameter and its
allowed range; vLLM's normalisations; the generation_config.json defaults reader."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from hwlm.sampling.generation_config import load_sampling_defaults
from hwlm.sampling.request_checks import check_params
from hwlm.sampling_params import ParameterError, SamplingParams

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
    with pytest.raises(ParameterError, match=re.escape(field)) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert range_text in str(info.value)
    assert info.value.param == field


@pytest.mark.parametrize(
    ("kwargs", "name", "param"),
    [
        (dict(temperature=0.0, n=2), "n must be 1 when using greedy", "n"),
        (dict(temperature=0.0, best_of=3), "best_of must be 1 when using greedy", "best_of"),
        (dict(stop="x", detokenize=False), "detokenize", "stop"),
        (dict(top_k=2.5), "top_k must be an integer", "top_k"),
        (dict(logit_bias={"a": 1.0}), "logit_bias must map integer token ids", "logit_bias"),
    ],
)
def test_other_invalid_combinations(kwargs: dict[str, Any], name: str, param: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(name)) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_parameter_error_survives_pickling() -> None:
    with pytest.raises(ParameterError) as info:
        SamplingParams(top_p=2.0)
    copy = pickle.loads(pickle.dumps(info.value))
    assert isinstance(copy, ParameterError) and copy.param == "top_p"
    assert str(copy) == str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "stream", "param"),
    [
        (dict(stop_token_ids=[50]), False, "stop_token_ids"),
        (dict(allowed_token_ids=[1, 64]), False, "allowed_token_ids"),
        (dict(logit_bias={99: 1.0}), False, "logit_bias"),
        (dict(prompt_logprobs=6), False, "prompt_logprobs"),
        (dict(best_of=2, n=1, temperature=1.0), True, "best_of"),
    ],
)
def test_model_checks_name_the_parameter(kwargs: dict[str, Any], stream: bool, param: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(param)) as info:
        check_params(SamplingParams(**kwargs), vocab_size=50, max_logprobs=5, stream=stream)
    assert info.value.param == param


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
