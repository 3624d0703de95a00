"""The offline LLM API: vLLM's names and semantics, and a clear ValueError for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hwlm import LLM, RequestOutput, SamplingParams
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def llm(device: str) -> LLM:
    return LLM("hwlm-tiny", device=device, max_model_len=256, num_kv_blocks=64, block_size=8)


def test_quickstart_as_in_vllm_docs(llm: LLM) -> None:
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    outputs = llm.generate(prompts, sampling_params)
    assert [o.prompt for o in outputs] == prompts  # input order
    for output in outputs:
        assert isinstance(output, RequestOutput) and output.finished
        completion = output.outputs[0]
        assert len(completion.token_ids) == 16 or completion.finish_reason == "stop"
        assert completion.text == llm.get_tokenizer().decode(
            completion.token_ids, skip_special_tokens=True
        )


def test_prompt_forms_and_per_prompt_params(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    ids = tokenizer("The capital of France is")["input_ids"]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    by_text = llm.generate("The capital of France is", greedy, use_tqdm=False)[0]
    by_ids = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.prompt_token_ids == ids
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = llm.generate(["a", "b"], [greedy, short], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 2]


def test_seed_reproducible_and_logprobs_ranked(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=123, max_tokens=8, ignore_eos=True, logprobs=3)
    a = llm.generate("Beautiful is better", params, use_tqdm=False)[0].outputs[0]
    b = llm.generate(["x y z", "Beautiful is better"], params, use_tqdm=False)[1].outputs[0]
    assert a.token_ids == b.token_ids
    for token, step in zip(a.token_ids, a.logprobs or [], strict=True):
        assert token in step and 3 <= len(step) <= 4  # the top 3, plus the sampled token
        by_rank = sorted(step.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in by_rank[:3]] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(by_rank, by_rank[1:], strict=False))
    assert a.cumulative_logprob == pytest.approx(
        sum(s[t].logprob for t, s in zip(a.token_ids, a.logprobs or [], strict=True))
    )


def test_top_k_one_is_greedy(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    top1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=6, ignore_eos=True)
    a, b = llm.generate(["Simple is better", "Simple is better"], [greedy, top1], use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_chat_uses_the_template(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3), use_tqdm=False
    )[0]
    assert out.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="messages"):
        llm.chat([], use_tqdm=False)


def test_all_blocks_free_after_requests(llm: LLM) -> None:
    llm.generate(
        ["one", "two two", "three three three"], SamplingParams(max_tokens=20), use_tqdm=False
    )
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


# Bad input -------------------------------------------------------------------------------------


def test_empty_prompt_list(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompts is empty"):
        llm.generate([], use_tqdm=False)


def test_empty_prompt(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)


def test_prompt_longer_than_max_model_len(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"300 tokens but max_model_len is 256"):
        llm.generate({"prompt_token_ids": [5] * 300}, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_token_ids_outside_vocabulary(llm: LLM) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 99999]}, use_tqdm=False)


def test_a_bad_prompt_in_a_batch_queues_nothing(llm: LLM) -> None:
    with pytest.raises(ValueError):
        llm.generate(["fine", {"prompt_token_ids": []}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_params_count_mismatch(llm: LLM) -> None:
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_unknown_architecture(tmp_path: Path, device: str) -> None:
    build_tiny_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture.*GPTNeoXForCausalLM"):
        LLM(str(tmp_path), device=device)


def test_missing_model_path(device: str) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/no/such/model/folder", device=device)


@pytest.mark.parametrize("bad", [0, -4])
def test_block_size_zero(bad: int, device: str) -> None:
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        LLM("hwlm-tiny", device=device, block_size=bad)


def test_unknown_device() -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        LLM("hwlm-tiny", device="tpu9")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("temperature", -1.0, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_k", -5, "top_k"),
        ("max_tokens", 0, "max_tokens"),
        ("min_p", 1.5, "min_p"),
        ("logprobs", -2, "logprobs"),  # -1 means the whole vocabulary, as in vLLM
    ],
)
def test_sampling_params_out_of_range(field: str, value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_kv_cache_too_small_for_one_sequence(device: str) -> None:
    llm = LLM("hwlm-tiny", device=device, num_kv_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="needs 5 KV blocks but the cache has only 2"):
        llm.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=10), use_tqdm=False)


def test_gpu_memory_utilization_alias(device: str) -> None:
    llm = LLM("hwlm-tiny", device=device, gpu_memory_utilization=0.5, max_model_len=128)
    assert llm.engine.config.memory_utilization == 0.5
    with pytest.raises(ValueError, match="disagree"):
        LLM("hwlm-tiny", device=device, memory_utilization=0.4, gpu_memory_utilization=0.5)


def test_token_budget_defaults_follow_vllm(llm: LLM) -> None:
    """Offline batches on a GPU get 16384 tokens a step; a server, and the CPU, 8192 (each
    backend's ``default_max_num_batched_tokens``)."""
    import importlib.util

    if llm.engine.backend.name == "cpu":
        assert llm.engine.backend.default_max_num_batched_tokens(offline=True) == 8192
    if importlib.util.find_spec("triton") is not None:
        from hwlm.backends.cuda import CUDABackend

        gpu = CUDABackend()  # starts no CUDA runtime
        assert gpu.default_max_num_batched_tokens(offline=True) == 16384
        assert gpu.default_max_num_batched_tokens(offline=False) == 8192
    expected = llm.engine.backend.default_max_num_batched_tokens(offline=True)
    assert llm.engine.config.max_num_batched_tokens == expected
