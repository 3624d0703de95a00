"""What distinguishes one generation API from another: its ``EndpointShape``.

``/v1/completions`` and ``/v1/chat/completions`` take the same path through the server
(``hwlm.server.pipeline``); each supplies a shape, which turns its request into prompts and
sampling parameters (``plan``) and lays out its choices and response bodies. Everything else --
admission, submission, fan-in of ``n`` samples and several prompts, streaming, usage, errors and
disconnects -- is the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from hwlm.outputs import RequestOutput
from hwlm.sampling_params import SamplingParams
from hwlm.server.choice_stream import ChoiceUpdate
from hwlm.server.engine_seam import Prompt, Seam
from hwlm.server.protocol import SamplingRequest


@dataclass(frozen=True)
class RequestPlan:
    """What to submit: one engine request per prompt, all with ``params``; ``param`` is the
    request field named when the engine rejects a prompt."""

    prompts: list[Prompt]
    params: SamplingParams
    param: str


class EndpointShape(Protocol):
    """One API's request and response shapes, for one request."""

    model: str  # the served model's name, as responses give it
    id_prefix: str  # of response ids: "cmpl", "chatcmpl"
    object_name: str  # a whole response's "object"
    chunk_object: str  # a stream chunk's "object"
    streams_every_token: bool  # a chunk per new token even without new text (logprobs)

    @property
    def request(self) -> SamplingRequest:
        """The parsed request."""

    async def plan(self, seam: Seam) -> RequestPlan:
        """Check the request (400s naming the field) and build its prompts and parameters."""

    async def accepted(self, seam: Seam) -> None:
        """Called once the engine has accepted every prompt, before any output is read: fetch
        what the choices need besides the outputs (completions: the echoed prompts' text)."""

    def opening_choices(self) -> list[dict[str, Any]]:
        """Choices a stream sends before any output (chat: the assistant's role)."""

    def chunk_choice(self, update: ChoiceUpdate) -> dict[str, Any]:
        """A stream chunk's choice for ``update``."""

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """A non-streamed response's fields after id, object, created and model: the choices
        for these finished outputs (one per prompt), the usage and any extras."""
