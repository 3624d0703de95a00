"""The offline API: ``LLM(model).generate(prompts, sampling_params)``, as in vLLM."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from hwlm.engine.llm_engine import LLMEngine
from hwlm.engine_args import from_kwargs, settings_doc
from hwlm.outputs import RequestOutput
from hwlm.sampling.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from hwlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


class LLM:
    """An engine for offline batches: ``LLM(model, **settings).generate(prompts, params)``.

    ``model`` is a local Hugging Face folder, a hub id (the HF cache and HF_HUB_OFFLINE are
    honoured) or a preset name (``hwlm-tiny``, ``qwen2.5-0.5b``, ... with ``load_format="dummy"``).
    The keyword settings are ``EngineArgs``' fields (``hwlm serve`` takes each as a ``--flag``);
    an unknown one is a TypeError. ``offline`` is on here: on a GPU, steps default to vLLM's
    offline budget of 16384 tokens, where the server keeps 8192 for latency.

    Settings (generated from ``hwlm.engine_args.EngineArgs``):
    """

    __doc__ = (__doc__ or "") + "\n" + settings_doc(defaults={"offline": True}) + "\n"

    def __init__(self, model: str, **settings: Any) -> None:
        settings.setdefault("offline", True)
        args = from_kwargs(model, settings)
        if args.data_parallel_size != 1:  # vLLM too runs offline data parallelism by launches
            raise ValueError(
                f"LLM runs one engine; data_parallel_size={args.data_parallel_size} is for "
                "hwlm serve (offline, start one LLM per device or share of the CPU)"
            )
        self.engine = LLMEngine(args)
        self._request_counter = itertools.count()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block (e.g. between benchmark runs); False while requests run."""
        return self.engine.block_manager.reset_prefix_cache()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams ``generate`` uses when given none: vLLM's defaults, overridden by
        the model's generation_config.json (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens)."""
        return self.engine.get_default_sampling_params()

    def beam_search(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        params: BeamSearchParams,
        *,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt (see ``hwlm.sampling.beam_search``); one output per prompt, its
        ``sequences`` best first, each holding the prompt and generated tokens and their text."""
        prompt_ids = []
        for prompt in _as_prompt_list(prompts):
            _, ids = self.engine._tokenize(prompt)
            prompt_ids.append(ids)

        def generate(batch: list[dict[str, Any]], sp: SamplingParams) -> list[RequestOutput]:
            return self.generate(batch, sp, use_tqdm=use_tqdm)

        return beam_search(generate, self.engine.tokenizer, prompt_ids, params)

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: SequenceABC[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of ``prompts``.
        ``priority`` (one per prompt, lower first) needs ``scheduling_policy="priority"``."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = _as_params_list(sampling_params, len(prompt_list))
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"priority has {len(priority)} values for {len(prompt_list)} prompts")
        priorities = priority if priority is not None else [0] * len(prompt_list)
        ids = []
        try:
            for prompt, params, prio in zip(prompt_list, params_list, priorities, strict=True):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, params, priority=prio)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list) and generate."""
        if not messages:
            raise ValueError("messages is empty")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts: list[PromptType] = []
        for conversation in conversations:
            if not conversation:
                raise ValueError("a conversation has no messages")
            try:
                text = tokenizer.apply_chat_template(
                    conversation,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    chat_template=chat_template,
                )
            except Exception as exc:
                raise ValueError(f"cannot apply the chat template: {exc}") from exc
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        output_tokens = 0
        with bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    results[out.request_id] = out
                    output_tokens += sum(len(c.token_ids) for c in out.outputs)
                    bar.update(1)
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(
                        f"output {output_tokens / elapsed:.1f} tok/s", refresh=False
                    )
        return [results[r] for r in request_ids]


def _as_prompt_list(prompts: PromptType | SequenceABC[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id prompt
    prompt_list: list[PromptType] = list(prompts)  # type: ignore[arg-type]
    if not prompt_list:
        raise ValueError("prompts is empty: give at least one prompt")
    return prompt_list


def _as_params_list(
    params: SamplingParams | SequenceABC[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params_list = list(params)
    if len(params_list) != count:
        raise ValueError(
            f"got {len(params_list)} sampling params for {count} prompts; give one or one per prompt"
        )
    return params_list
