"""Which API process each of the engine core's messages goes to (``--api-server-count``).

With several API processes, each connects its own output socket to the engine core, and every
``AddRequest`` names its sender (``client_index``). ``OutputRouter`` remembers the sender of each
live request and splits the core's messages: a request's acceptance, error and deltas go to its
sender only; the handshake, the stats and the engine's death go to everyone. With one client it
sends everything to that one, unchanged.
"""

from __future__ import annotations

from hwlm.engine.messages import (
    AbortRequests,
    Accepted,
    AddRequest,
    EngineOutput,
    RequestError,
    StepOutputs,
)


class OutputRouter:
    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self._sender: dict[str, int] = {}  # live request id -> client index

    def note_inputs(self, inputs: list[AddRequest | AbortRequests]) -> None:
        """Remember who sent each new request (before the core sees the inputs)."""
        if self.num_clients == 1:
            return
        for message in inputs:
            if isinstance(message, AddRequest):
                self._sender[message.request_id] = message.client_index
            else:
                for request_id in message.request_ids:
                    self._sender.pop(request_id, None)

    def route(self, messages: list[EngineOutput]) -> list[tuple[int | None, EngineOutput]]:
        """``(client index, message)`` pairs in order; None: every client."""
        if self.num_clients == 1:
            return [(0, m) for m in messages]
        routed: list[tuple[int | None, EngineOutput]] = []
        for message in messages:
            if isinstance(message, StepOutputs):
                routed.extend(self._split_outputs(message))
            elif isinstance(message, Accepted):
                by_client: dict[int, list[str]] = {}
                for request_id in message.request_ids:
                    by_client.setdefault(self._client(request_id), []).append(request_id)
                routed.extend((c, Accepted(ids)) for c, ids in by_client.items())
            elif isinstance(message, RequestError):
                routed.append((self._sender.pop(message.request_id, 0), message))
            else:
                routed.append((None, message))
        return routed

    def _split_outputs(self, message: StepOutputs) -> list[tuple[int | None, EngineOutput]]:
        by_client: dict[int, StepOutputs] = {}
        for delta in message.outputs:
            client = self._client(delta.request_id)
            if delta.finished:
                self._sender.pop(delta.request_id, None)
            by_client.setdefault(client, StepOutputs([])).outputs.append(delta)
        return list(by_client.items())

    def _client(self, request_id: str) -> int:
        return self._sender.get(request_id, 0)
