"""Hugging Face transformers baselines for the offline-throughput benchmark (C1).

Two baselines run on the same model and prompts as hwlm, greedy, with EOS disabled so that every
request produces exactly ``output_len`` tokens (hwlm's ``ignore_eos=True``: EOS may be emitted but
never stops a request, and it is never masked out):

* ``hf_generate``: ``model.generate`` on left-padded batches (all prompts in one, or
  ``batch_size`` at a time), with an attention mask;
* ``hf_generate_batch``: transformers' continuous batching, ``model.generate_batch``.

transformers is imported lazily, inside the functions, so importing hwlm does not load it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel

logger = logging.getLogger(__name__)

_PAD_ID = 0  # left padding for hf_generate; masked out, so any id works
_WARMUP_PROMPTS = 2
_WARMUP_TOKENS = 4
# transformers' continuous batching logs through its own handler, about a dozen lines per call.
_CB_LOGGER = "ContinuousBatchingLogger"


@dataclass
class BaselineResult:
    """One timed baseline run. ``output_token_ids[i]`` are the generated ids of ``prompts[i]``."""

    name: str
    seconds: float
    output_token_ids: list[list[int]]
    output_tokens_per_s: float
    requests_per_s: float


def make_prompts(
    num_prompts: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0
) -> list[list[int]]:
    """Random token-id prompts, lengths uniform in [min_len, max_len] (inclusive), ids in [0, vocab).

    The recipe is fixed (the benchmark depends on it): ``rng = numpy.random.default_rng(seed)``,
    all lengths first, then each prompt's ids in order.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_prompts)
    return [rng.integers(0, vocab_size, size=int(n)).tolist() for n in lengths]


def build_hf_model(config_dict: dict[str, Any], folder: str, seed: int = 0) -> PreTrainedModel:
    """Build a randomly initialised causal LM from ``config_dict`` (a HF ``config.json`` dict with
    ``model_type``) after ``torch.manual_seed(seed)``, save it to ``folder`` as safetensors (with its
    config) so hwlm can load the same weights, and return it in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        config = AutoConfig.for_model(**config_dict)
        torch.manual_seed(seed)
        built = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        model: PreTrainedModel = built.eval()
        model.save_pretrained(folder)  # transformers 5 always writes safetensors
    _declare_dtype(Path(folder) / "config.json", config_dict.get("torch_dtype"))
    return model


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep the benchmark's output readable while transformers runs: its logs below ERROR, its
    continuous-batching log, its progress bars and Python warnings are silenced, and restored on
    exit. That log includes an ERROR on hosts without psutil, about a memory breakdown that the
    explicit cache size of ``_generate_continuous`` makes unnecessary; failed requests still
    raise. Under debug logging (``--log-level debug``) nothing is silenced."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    from transformers.utils import logging as hf_logging_module

    hf_logging: Any = hf_logging_module  # its setters are unannotated
    cb_logger = logging.getLogger(_CB_LOGGER)
    cb_level, verbosity = cb_logger.level, hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    cb_logger.setLevel(logging.CRITICAL + 1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        cb_logger.setLevel(cb_level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _declare_dtype(config_path: Path, dtype: str | None) -> None:
    """Put the preset's dtype back into the saved config.json: save_pretrained records the
    float32 it built in, and hwlm's ``dtype="auto"`` would then run a bfloat16 model in float32."""
    if not dtype:
        return
    config = json.loads(config_path.read_text())
    config["dtype"] = config["torch_dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2))


def _greedy_config(output_len: int, **overrides: Any) -> GenerationConfig:
    """Greedy, exactly ``output_len`` new tokens, EOS disabled.

    ``eos_token_id=[]`` (not ``None``, which both generate paths fill from the model config): no
    token stops a request, and no EOS logit is masked.
    """
    from transformers import GenerationConfig

    return GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        max_new_tokens=output_len,
        eos_token_id=[],
        pad_token_id=_PAD_ID,
        **overrides,
    )


def _generate_padded(
    model: PreTrainedModel, prompts: list[list[int]], output_len: int
) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    device = model.device
    input_ids = torch.tensor([[_PAD_ID] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
    )
    config = _greedy_config(output_len, min_new_tokens=output_len)
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]  # mypy sees nn.Module.__getattr__
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
    generated: list[list[int]] = out[:, width:].tolist()
    return generated


def _generate_in_batches(batch_size: int | None) -> Callable[..., list[list[int]]]:
    def generate(
        model: PreTrainedModel, prompts: list[list[int]], output_len: int
    ) -> list[list[int]]:
        size = batch_size or len(prompts)
        outputs: list[list[int]] = []
        for start in range(0, len(prompts), size):
            outputs += _generate_padded(model, prompts[start : start + size], output_len)
        return outputs

    return generate


def _generate_continuous(
    model: PreTrainedModel, prompts: list[list[int]], output_len: int
) -> list[list[int]]:
    from transformers import ContinuousBatchingConfig

    # Size the paged cache to hold every request at once; left to itself, transformers sizes it
    # from host RAM on CPU (~3 GiB here). Other settings keep their defaults (page_size=256,
    # max_batch_tokens=8192, attention "sdpa" as loaded, per-call warmup on).
    cb_config = ContinuousBatchingConfig()
    cb_config.num_blocks = sum(
        math.ceil((len(p) + output_len) / cb_config.page_size) for p in prompts
    )
    # No inference_mode here: generate_batch runs the model in a background thread under
    # no_grad, and in-place updates there fail on tensors created in inference mode.
    results = model.generate_batch(  # type: ignore[operator]
        inputs=prompts,
        generation_config=_greedy_config(output_len),
        continuous_batching_config=cb_config,
        progress_bar=False,
    )
    # generate_batch logs failures instead of raising, and returns results in input order.
    outputs = list(results.values())
    failed = [o for o in outputs if o.error is not None]
    if len(outputs) != len(prompts) or failed:
        first = f"; first error: {failed[0].error}" if failed else ""
        raise RuntimeError(
            f"generate_batch returned {len(outputs)}/{len(prompts)} results, "
            f"failed: {[o.request_id for o in failed]}{first}"
        )
    return [list(o.generated_tokens) for o in outputs]


def _timed_run(
    name: str,
    generate: Callable[[PreTrainedModel, list[list[int]], int], list[list[int]]],
    model: PreTrainedModel,
    prompts: list[list[int]],
    output_len: int,
) -> BaselineResult:
    """Untimed warm-up on a couple of short requests, then one timed run of all prompts."""
    with quiet_transformers():
        generate(model, prompts[:_WARMUP_PROMPTS], min(_WARMUP_TOKENS, output_len))
        start = time.perf_counter()
        outputs = generate(model, prompts, output_len)
        seconds = time.perf_counter() - start
    bad = [i for i, out in enumerate(outputs) if len(out) != output_len]
    if len(outputs) != len(prompts) or bad:
        raise RuntimeError(f"{name}: expected {output_len} tokens per prompt; wrong at {bad}")
    num_tokens = len(prompts) * output_len
    logger.info(
        "%s: %d requests, %d output tokens in %.2f s", name, len(prompts), num_tokens, seconds
    )
    return BaselineResult(
        name=name,
        seconds=seconds,
        output_token_ids=outputs,
        output_tokens_per_s=num_tokens / seconds,
        requests_per_s=len(prompts) / seconds,
    )


def run_hf_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    output_len: int,
    batch_size: int | None = None,
) -> BaselineResult:
    """``model.generate`` on left-padded batches of ``batch_size`` prompts (default: all in one),
    greedy, exactly ``output_len`` new tokens each, the model's attention implementation (sdpa
    by default)."""
    name = "hf_generate" if batch_size is None else f"hf_generate (batches of {batch_size})"
    generate = _generate_in_batches(batch_size)
    return _timed_run(name, generate, model, prompts, output_len)


def run_hf_generate_batch(
    model: PreTrainedModel, prompts: list[list[int]], output_len: int
) -> BaselineResult:
    """transformers continuous batching, ``model.generate_batch`` (greedy, exactly ``output_len``
    new tokens each, the model's sdpa attention over a paged cache). The timed run includes the
    cache allocation that every ``generate_batch`` call does."""
    return _timed_run("hf_generate_batch", _generate_continuous, model, prompts, output_len)
