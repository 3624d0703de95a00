"""The transformers baselines of the throughput benchmark, on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from hwlm.bench.hf_baselines import (
    build_hf_model,
    make_prompts,
    run_hf_generate,
    run_hf_generate_batch,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

pytest.importorskip("transformers")

VOCAB = 512
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
OUTPUT_LEN = 12


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedModel:
    return build_hf_model(TINY_LLAMA, str(tmp_path_factory.mktemp("tiny-llama")), seed=0)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(6, 4, 40, VOCAB, seed=0)


def test_make_prompts_is_deterministic_and_in_range() -> None:
    prompts = make_prompts(50, 32, 256, 32000, seed=0)
    assert prompts == make_prompts(50, 32, 256, 32000, seed=0)
    assert prompts != make_prompts(50, 32, 256, 32000, seed=1)
    assert len(prompts) == 50
    assert all(32 <= len(p) <= 256 for p in prompts)
    assert all(0 <= t < 32000 for p in prompts for t in p)
    assert all(type(t) is int for p in prompts for t in p)


def test_build_hf_model_saves_loadable_weights(tiny_model: PreTrainedModel, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "again"
    again = build_hf_model(TINY_LLAMA, str(folder), seed=0)
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_baselines_agree_with_unpadded_generate(
    tiny_model: PreTrainedModel, prompts: list[list[int]]
) -> None:
    generate = run_hf_generate(tiny_model, prompts, OUTPUT_LEN)
    batch = run_hf_generate_batch(tiny_model, prompts, OUTPUT_LEN)
    for result in (generate, batch):
        assert len(result.output_token_ids) == len(prompts)
        assert all(len(out) == OUTPUT_LEN for out in result.output_token_ids)
        assert result.seconds > 0
        assert result.output_tokens_per_s == pytest.approx(
            len(prompts) * OUTPUT_LEN / result.seconds
        )
        assert result.requests_per_s == pytest.approx(len(prompts) / result.seconds)
    assert batch.output_token_ids == generate.output_token_ids

    from transformers import GenerationConfig

    # Reference: one unpadded prompt at a time. eos_token_id=[] so EOS neither stops nor is masked.
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False, max_new_tokens=OUTPUT_LEN, eos_token_id=[], pad_token_id=0
    )
    with torch.inference_mode():
        for prompt, out in zip(prompts, generate.output_token_ids, strict=True):
            ref = tiny_model.generate(  # type: ignore[operator]  # nn.Module.__getattr__
                input_ids=torch.tensor([prompt]), generation_config=config
            )
            assert ref[0, len(prompt) :].tolist() == out


def test_baselines_run_quietly_at_info_level(
    tmp_path: Path,
    prompts: list[list[int]],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """transformers' continuous batching prints a dozen log lines per call (and an ERROR on hosts
    without psutil); under `hwlm --log-level info` the benchmark shows none of them, and the
    logging state is restored afterwards."""
    import logging

    from transformers.utils import logging as hf_logging_module

    hf_logging: Any = hf_logging_module  # unannotated
    caplog.set_level(logging.INFO)  # the root level, as `hwlm --log-level info` sets it
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    before = (cb_logger.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    model = build_hf_model(TINY_LLAMA, str(tmp_path), seed=0)
    run_hf_generate_batch(model, prompts[:2], 2)
    err = capfd.readouterr().err
    assert "ContinuousBatchingLogger" not in err and "Writing model shards" not in err, err
    assert before == (
        cb_logger.level,
        hf_logging.get_verbosity(),
        hf_logging.is_progress_bar_enabled(),
    )


def test_saved_folder_declares_the_presets_dtype(tmp_path: Path) -> None:
    """Weights are built in float32, but config.json must say what the real model uses, so that
    hwlm's dtype="auto" runs the benchmark in the same dtype as the model it stands for."""
    import json

    from hwlm.bench.hf_baselines import build_hf_model
    from hwlm.presets import get_preset

    preset = {**(get_preset("hwlm-tiny") or {}), "torch_dtype": "bfloat16"}
    build_hf_model(preset, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
