"""Beam search, as vLLM's ``LLM.beam_search``: one engine step per generated token.

Each step generates one token for every live beam with ``logprobs = 2 * beam_width`` and keeps, per
prompt, the ``beam_width`` best extensions by the length-penalised score
``cumulative_logprob / length ** length_penalty`` (length counts the prompt and the generated
tokens, minus a final EOS). A beam that ends in EOS is set aside as completed (unless
``ignore_eos``). After ``max_tokens`` steps, or when no beam is live, the ``beam_width`` best of the
completed and live beams are returned, best first. The prefix cache keeps every step's prompt
(the beam so far) from being recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hwlm.outputs import Logprob, RequestOutput
from hwlm.sampling_params import ParameterError, SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int):
            raise ParameterError(
                f"beam_width must be an integer, got {self.beam_width!r}", "beam_width"
            )
        if self.beam_width < 1:
            raise ParameterError(
                f"beam_width must be at least 1, got {self.beam_width}", "beam_width"
            )
        if self.max_tokens < 1:
            raise ParameterError(
                f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens"
            )
        if self.temperature < 0:
            raise ParameterError(
                f"temperature must be non-negative, got {self.temperature}", "temperature"
            )


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` holds the prompt and the generated tokens, as in vLLM."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


def beam_search_score(
    tokens: list[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float
) -> float:
    length = len(tokens) - (1 if tokens and tokens[-1] == eos_token_id else 0)
    return cum_logprob / math.pow(length, length_penalty)


Generate = Callable[[list[dict[str, Any]], SamplingParams], list[RequestOutput]]


def beam_search(
    generate: Generate,
    tokenizer: Any,
    prompt_token_ids: list[list[int]],
    params: BeamSearchParams,
) -> list[BeamSearchOutput]:
    """``generate(prompts, sampling_params)`` runs one engine batch (``LLM.generate``)."""
    eos = getattr(tokenizer, "eos_token_id", None)

    def score(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

    step_params = SamplingParams(
        logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature
    )
    live = [[BeamSearchSequence(tokens=list(p))] for p in prompt_token_ids]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompt_token_ids]
    for _ in range(params.max_tokens):
        beams = [beam for group in live for beam in group]
        if not beams:
            break
        outputs = generate([{"prompt_token_ids": b.tokens} for b in beams], step_params)
        results = iter(outputs)
        for i, group in enumerate(live):
            candidates = []
            for beam in group:
                entry = next(results).outputs[0].logprobs
                assert entry is not None
                for token_id, lp in entry[0].items():
                    new = BeamSearchSequence(
                        tokens=[*beam.tokens, token_id],
                        logprobs=[*beam.logprobs, entry[0]],
                        cum_logprob=beam.cum_logprob + lp.logprob,
                    )
                    if token_id == eos and not params.ignore_eos:
                        new.finish_reason = "stop"
                        completed[i].append(new)
                    else:
                        candidates.append(new)
            live[i] = sorted(candidates, key=score, reverse=True)[: params.beam_width]
    results_out = []
    for group, done in zip(live, completed, strict=True):
        for beam in group:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(done + group, key=score, reverse=True)[: params.beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens)
        results_out.append(BeamSearchOutput(sequences=best))
    return results_out
