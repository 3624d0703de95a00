"""What rank 0 tells the workers, once per step: a small control message over ZeroMQ (which
wakes them without a collective timeout running while the engine is idle), then the step's
tensors as one packed int64 tensor through the group's broadcast (device to device on GPUs).

Messages are msgpack lists whose first item is the kind.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch
import zmq

from hwlm.attention import AttentionMetadata

STEP = 0  # header: tokens, seqs, block-table columns, max_query_len, max_seq_len, copies
LOGITS = 1  # rows, hidden size: the rows' hidden states follow by broadcast
KV_CACHE = 2  # num_blocks, block_size, dtype name: allocate the KV cache (replacing the last)
BUDGET = 3  # memory_utilization: all-reduce the smallest KV budget in bytes
STOP = 4
CAPTURE = 5  # max_num_seqs, max_model_len: capture the decode runner (CUDA graphs) over the cache


def pack_step(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    metadata: AttentionMetadata,
    copies: list[tuple[int, int]],
) -> tuple[list[int], torch.Tensor]:
    """The header and the payload (int64, on the inputs' device) of one step."""
    tables = metadata.block_tables
    parts = [
        input_ids,
        positions,
        metadata.slot_mapping,
        metadata.query_start_loc.long(),
        metadata.seq_lens.long(),
        tables.reshape(-1).long(),
    ]
    if copies:
        parts.append(torch.tensor(copies, dtype=torch.int64).reshape(-1).to(input_ids.device))
    header = [
        STEP,
        int(input_ids.shape[0]),
        int(tables.shape[0]),
        int(tables.shape[1]),
        metadata.max_query_len,
        metadata.max_seq_len,
        len(copies),
    ]
    return header, torch.cat(parts)


def payload_size(header: list[int]) -> int:
    _, tokens, seqs, cols, _, _, copies = header
    return 3 * tokens + 2 * seqs + 1 + seqs * cols + 2 * copies


def unpack_step(
    header: list[int], payload: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple[int, int]]]:
    """``pack_step``'s inputs back from its header and payload."""
    _, tokens, seqs, cols, max_query_len, max_seq_len, copies = header
    sizes = [tokens, tokens, tokens, seqs + 1, seqs, seqs * cols, 2 * copies]
    ids, pos, slots, qsl, lens, tables, pairs = torch.split(payload, sizes)
    metadata = AttentionMetadata(
        query_start_loc=qsl.int(),
        seq_lens=lens.int(),
        block_tables=tables.int().view(seqs, cols),
        slot_mapping=slots,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
    )
    flat = pairs.tolist() if copies else []
    return ids, pos, metadata, [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


class ControlSender:
    """Rank 0's end: one PUSH socket per worker, each bound to a free port of ``host``; and a
    PULL socket the workers report start-up results to."""

    def __init__(self, host: str, num_workers: int) -> None:
        self._context = zmq.Context()
        self._encoder = msgspec.msgpack.Encoder()
        self._sockets = []
        self.addresses = []
        for _ in range(num_workers):
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(f"tcp://{host}:*")
            self._sockets.append(sock)
            self.addresses.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.replies = self._context.socket(zmq.PULL)
        self.replies.setsockopt(zmq.LINGER, 0)
        self.replies.bind(f"tcp://{host}:*")
        self.reply_address = self.replies.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, message: list[Any]) -> bool:
        """Queue ``message`` for every worker; False when one is no longer connected (a PUSH
        socket without its peer would block: it never does here)."""
        frame = self._encoder.encode(message)
        delivered = True
        for sock in self._sockets:
            try:
                sock.send(frame, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                delivered = False
        return delivered

    def receive_reply(self, timeout_ms: int) -> list[Any] | None:
        if not self.replies.poll(timeout_ms):
            return None
        reply: list[Any] = msgspec.msgpack.decode(self.replies.recv())
        return reply

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self.replies.close(linger=0)
        self._context.term()
