"""The messages between the API side and the engine core, as msgspec Structs.

Both clients (``hwlm.engine.client_inproc``, ``hwlm.engine.client_mp``) speak these; the
multi-process one sends them as msgpack over ZeroMQ. Every message is a named, tagged Struct
(never a pickled object or closure), so each side decodes exactly the types it expects:
``EngineInput`` goes to the engine core, ``EngineOutput`` comes back.

Outputs are deltas: a ``RequestDelta`` holds, per sample, only the tokens (and their logprobs)
new since the request's previous delta, so no step's message grows with the length of an
output. Prompt logprobs travel once, in a request's first delta. Text never crosses: the API
side detokenizes (``hwlm.engine.client_outputs``). Stop strings are still checked in the engine
core, which stops a sample on the token that completes one and reports the string as its
``stop_reason``; the API side cuts its own text there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from hwlm.sampling_params import SamplingParams, StructuredOutputsParams

# To the engine core ------------------------------------------------------------------------------


class StructuredOutputsOptions(
    msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Every ``StructuredOutputsParams`` field, in wire form."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    after_token_ids: list[int] | None = None

    @classmethod
    def from_params(cls, params: StructuredOutputsParams) -> StructuredOutputsOptions:
        return cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(params)})

    def to_params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(**msgspec.structs.asdict(self))


class SamplingOptions(
    msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Every ``SamplingParams`` field, in wire form (``stop`` always a list)."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    bad_words: list[str] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsOptions | None = None

    @classmethod
    def from_params(cls, params: SamplingParams) -> SamplingOptions:
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
        fields["stop"] = params.stop_strings
        fields["stop_token_ids"] = list(params.stop_token_ids or [])
        fields["bad_words"] = list(params.bad_words or [])
        if params.structured_outputs is not None:
            structured = StructuredOutputsOptions.from_params(params.structured_outputs)
            fields["structured_outputs"] = structured
        return cls(**fields)

    def to_params(self) -> SamplingParams:
        """The SamplingParams again; its validation runs (ParameterError names the field)."""
        fields = msgspec.structs.asdict(self)
        if self.structured_outputs is not None:
            fields["structured_outputs"] = self.structured_outputs.to_params()
        return SamplingParams(**fields)


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    """Start a request. ``arrival_time`` is ``time.monotonic()`` on the API side (the monotonic
    clock is system-wide, so the engine's latency metrics may compare it with its own)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingOptions
    stream: bool  # a delta after every step that gives it a token; else one when it finishes
    arrival_time: float
    # Which API process sent it (``--api-server-count``): its answers go there.
    client_index: int = 0
    priority: int = 0  # the priority scheduling policy's order (lower first)
    group: str | None = None  # the share rule's group (None: the request alone)


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    """Stop these requests and free their KV blocks; unknown or finished ids are ignored."""

    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    """Exit now: in-flight requests end unfinished (the client has already failed them)."""


EngineInput = AddRequest | AbortRequests | Shutdown


# From the engine core -----------------------------------------------------------------------------


class EngineInfo(msgspec.Struct, tag=True, array_like=True, kw_only=True):
    """The handshake: sent once the engine is built and warmed up, before anything else."""

    model: str
    tokenizer: str  # a folder or hub id: the API side loads its own tokenizer from it
    architecture: str
    backend: str
    dtype: str
    vocab_size: int
    max_model_len: int
    max_logprobs: int  # -1: no limit
    eos_token_ids: list[int]
    block_size: int
    num_kv_blocks: int
    sampling_defaults: dict[str, Any]  # generation_config.json's SamplingParams fields
    pid: int  # the engine core's process


class StartupFailed(msgspec.Struct, tag=True, array_like=True):
    """Building the engine failed (a bad model name, a backend that cannot serve it, ...)."""

    message: str  # one line
    error_type: str  # the exception's class name; "ValueError" for the user's mistakes


class Accepted(msgspec.Struct, tag=True, array_like=True):
    """These requests passed the engine's checks and are queued (one message per input batch)."""

    request_ids: list[str]


class RequestError(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    """One request failed; the engine runs on. ``rejected``: refused when added (``param``
    names the SamplingParams field at fault, if one is); otherwise it failed while running."""

    request_id: str
    message: str
    param: str | None = None
    rejected: bool = True


class TokenLogprobs(msgspec.Struct, array_like=True):
    """One position's logprobs: the top-N tokens in rank order, then the chosen token if it is
    not among them (``hwlm.outputs.Logprob`` without ``decoded_token``, which the API side
    fills in)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # 1 = the most likely token


class SampleDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one sample (``CompletionOutput.index``) gained in a step."""

    index: int
    token_ids: list[int]  # the new tokens only
    cumulative_logprob: float  # over all of the sample's tokens so far
    logprobs: list[TokenLogprobs] | None = None  # one per new token, with SamplingParams.logprobs
    finish_reason: str | None = None  # set once, in the sample's last delta
    stop_reason: int | str | None = None


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one request gained in a step: only the samples that changed."""

    request_id: str
    samples: list[SampleDelta]
    finished: bool = False  # its last delta: every sample has finished
    num_cached_tokens: int | None = None  # prompt tokens from the prefix cache, when it changes
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, in the first delta


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    """One engine step's deltas."""

    outputs: list[RequestDelta]


class HistogramCounts(msgspec.Struct, array_like=True):
    """A latency histogram; its bucket bounds are ``hwlm.engine.serving_metrics``' constants."""

    counts: list[int]
    sum: float
    count: int


class EngineStats(msgspec.Struct, tag=True, array_like=True, kw_only=True):
    """What /metrics reads: the scheduler's and KV cache's gauges, and the totals kept in the
    engine core. Sent periodically while busy, before the outputs of a step that ended
    requests (so a client told of the end reads up-to-date counters), and on going idle."""

    num_running: int = 0  # requests
    num_waiting: int = 0
    num_running_seqs: int = 0  # sequences, counting the samples a running prompt will fork
    num_waiting_seqs: int = 0  # the same for waiting requests (of every client of the core)
    num_free_blocks: int = 0
    num_blocks: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of which were found
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = {}  # finish reason ("stop", "length", "abort") -> requests
    ttft: HistogramCounts | None = None  # time to first token
    itl: HistogramCounts | None = None  # inter-token latency
    e2e: HistogramCounts | None = None  # request latency


class EngineDead(msgspec.Struct, tag=True, array_like=True):
    """A step failed: every request is lost and the engine core exits."""

    message: str


EngineOutput = (
    EngineInfo | StartupFailed | Accepted | RequestError | StepOutputs | EngineStats | EngineDead
)


def input_decoder() -> msgspec.msgpack.Decoder[EngineInput]:
    return msgspec.msgpack.Decoder(EngineInput)


def output_decoder() -> msgspec.msgpack.Decoder[EngineOutput]:
    return msgspec.msgpack.Decoder(EngineOutput)
