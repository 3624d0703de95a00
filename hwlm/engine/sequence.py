"""A sequence: one prompt and the tokens generated for it, plus its place in the KV cache."""

from __future__ import annotations

import copy
import enum
import time

import numpy as np
import torch

from hwlm.outputs import PromptLogprobs, SampleLogprobs
from hwlm.sampling.structured.state import GrammarState
from hwlm.sampling_params import SamplingParams
from hwlm.text.detokenizer import Detokenizer


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
        self.priority = 0  # the scheduler's priority policy: lower runs first
        self.group = request_id  # the scheduler's share rule counts seats per group
        self.prompt = prompt
        self.params = params
        self.argmax_only = params.argmax_only  # read by the sampler for every row of every step
        self.argmax_within_grammar = params.argmax_within_grammar
        # The model's EOS ids. min_tokens masks them whatever ignore_eos says (as vLLM does);
        # they end the sequence only without ignore_eos.
        self.eos_token_ids = eos_token_ids
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = Status.WAITING
        self.arrival_time = time.monotonic()
        # KV-cache state, owned by the BlockManager and the Scheduler.
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's cached full blocks
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens that came from the prefix cache
        # Overlapped steps: a token sampled on the device but not yet appended to token_ids, and
        # its row in that step's sampled tokens (the next step reads it there, on the device).
        self.num_pending_tokens = 0
        self.pending_row = -1
        # Results.
        self.cumulative_logprob = 0.0
        self.logprobs: SampleLogprobs | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator: torch.Generator | None = None  # per-request RNG when params.seed is set
        self.detokenizer: Detokenizer | None = None  # streamed or stop strings
        self.stream = False  # report after every token, not only when finished
        self.output_text: str | None = None  # the final text when a stop string cut it
        self.bad_words_token_ids: list[list[int]] = []  # params.bad_words, tokenized
        # params.structured_outputs: the grammar's state, advanced over the output tokens.
        self.grammar: GrammarState | None = None
        self.prompt_logprobs: PromptLogprobs | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        # Parallel sampling: the first sequence of a request forks into best_of samples once its
        # prompt is computed; the forks share its KV blocks.
        self.sample_index = 0
        self.num_forks_left = (params.best_of or 1) - 1
        self.pending_forks: list[Sequence] = []  # forked this step, sampled with the parent
        self._prompt_array: np.ndarray | None = None

    def fork(self, seq_id: int, sample_index: int) -> Sequence:
        """A sibling with the same tokens and results so far; blocks are shared by the caller
        (``BlockManager.fork``). A seeded request's sample ``i`` draws with seed + i."""
        child = copy.copy(self)
        child.seq_id = seq_id
        child.sample_index = sample_index
        child.token_ids = list(self.token_ids)
        child.block_ids, child.block_hashes = [], []
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.prompt_logprobs = None  # reported once per request, by the first sample
        child.num_forks_left = 0
        child.pending_forks = []
        child.generator = None
        if self.grammar is not None:
            child.grammar = self.grammar.copy()
        if self.detokenizer is not None:
            child.detokenizer = self.detokenizer.copy()
        return child

    @property
    def seed(self) -> int | None:
        seed = self.params.seed
        return None if seed is None else seed + self.sample_index

    @property
    def prompt_token_set(self) -> np.ndarray:
        """The distinct token ids of the prompt, as a sorted int64 array (built once)."""
        if self._prompt_array is None:
            self._prompt_array = np.unique(np.asarray(self.token_ids[: self.num_prompt_tokens]))
            self._prompt_array = self._prompt_array.astype(np.int64)
        return self._prompt_array

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to record (the prompt must be computed, not served from cache)."""
        return (
            self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        """The length once the tokens sampled in a step still in flight are appended."""
        return len(self.token_ids) + self.num_pending_tokens

    def stops_by_length_when_pending_lands(self, max_model_len: int) -> bool:
        """True if a token in flight will end this sequence by max_tokens or the length limit
        (so scheduling it again would compute a token nobody keeps)."""
        if not self.num_pending_tokens:
            return False
        max_tokens = self.params.max_tokens
        if (
            max_tokens is not None
            and self.num_output_tokens + self.num_pending_tokens >= max_tokens
        ):
            return True
        return self.num_tokens_with_pending >= max_model_len

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
