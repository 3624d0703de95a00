"""A sequence: one prompt and the tokens generated for it, plus its place in the KV cache."""

from __future__ import annotations

import enum
import time

import torch

from hwlm.outputs import SampleLogprobs
from hwlm.sampling_params import SamplingParams
from hwlm.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = Status.WAITING
        self.arrival_time = time.monotonic()
        # KV-cache state, owned by the BlockManager and the Scheduler.
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's cached full blocks
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens that came from the prefix cache
        # Results.
        self.cumulative_logprob = 0.0
        self.logprobs: SampleLogprobs | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator: torch.Generator | None = None  # per-request RNG when params.seed is set
        self.detokenizer: IncrementalDetokenizer | None = None  # set for streamed requests

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_ids}, {self.status.value})"
        )
