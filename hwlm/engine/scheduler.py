"""Continuous batching: which sequences run this step, and how many tokens each.

One policy covers prefill, chunked prefill and decode, as in vLLM's v1 scheduler: every running
sequence has ``num_tokens - num_computed_tokens`` tokens still to process (one, for a decode).
Each step fills a token budget (``max_num_batched_tokens``), running sequences first in arrival
order, then waiting ones, first come first served. A prompt longer than what is left of the budget
is cut into chunks over several steps. When the KV cache runs out, the most recently arrived
running sequence is preempted: its blocks are freed and it is recomputed later (its cached prefix
blocks usually survive, so resuming is cheap).

Fair sharing: one request group (``Sequence.group``: the request's own id, or what its caller
named; the server gives all the engine requests of one response its id) may hold at most
``max_request_share`` of ``max_num_seqs`` running sequences while sequences of other groups wait. When such a sequence cannot get a seat,
the over-share request gives up its newest running sequences (preempted, recomputed later), and
its waiting sequences are passed over; they run again once nothing else waits. A request alone on
the server may use every seat.

With overlapped steps (``hwlm.engine.llm_engine``) a sequence may have a token in flight: sampled by the step
still running on the device. It counts as known here (``num_tokens_with_pending``), so the next
step computes it; a sequence that the token in flight will end by length is left out.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from hwlm.config import EngineConfig
from hwlm.engine.block_manager import BlockManager
from hwlm.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens to compute, per sequence
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.max_request_share = config.max_request_share
        self.by_priority = config.scheduling_policy == "priority"
        self._swaps = 0  # seats freed this step for starved groups, not yet taken

    @property
    def share_limit(self) -> int | None:
        """The most running sequences one request group may hold while others wait (None: no
        limit)."""
        if self.max_request_share >= 1.0:
            return None
        return max(1, int(self.max_request_share * self.config.max_num_seqs))

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        if self.by_priority:
            self._insert_by_priority(seq)
        else:
            self.waiting.append(seq)

    def _insert_by_priority(self, seq: Sequence) -> None:
        """Into ``waiting``, kept in (priority, arrival) order."""
        key = _priority_key(seq)
        i = len(self.waiting)
        while i > 0 and _priority_key(self.waiting[i - 1]) > key:
            i -= 1
        self.waiting.insert(i, seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence that already holds its blocks (a parallel-sampling fork)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def num_running_seqs(self) -> int:
        """Running sequences, counting the samples a running prompt will fork (they join the
        batch without waiting)."""
        return len(self.running) + sum(s.num_forks_left for s in self.running)

    def num_waiting_seqs(self) -> int:
        """Waiting sequences, counting the samples each will fork once it runs (a preempted
        sequence waits again and counts here)."""
        return len(self.waiting) + sum(s.num_forks_left for s in self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        if self.by_priority:  # the lowest priority runs last, so it is preempted first
            self.running.sort(key=_priority_key)
        starved = self._make_room()
        preempted = self._schedule_running(batch, budget)
        budget -= batch.total_tokens
        if not preempted:
            self._schedule_waiting(batch, budget, starved)
        batch.copies = self.block_manager.take_pending_copies()
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.stops_by_length_when_pending_lands(self.config.max_model_len):
                i += 1  # finishes once its token in flight lands: nothing more to compute
                continue
            num_new = min(seq.num_tokens_with_pending - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                preempted = True
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
        return preempted

    def wants_seats_back(self) -> bool:
        """Whether the share rule would preempt now: every seat taken, a group over its share,
        and another group's sequence waiting under its share. With overlapped steps the engine
        then finishes the step in flight first (sequences with a token in flight are never
        preempted)."""
        limit = self.share_limit
        if limit is None or not self.waiting or len(self.running) < self.config.max_num_seqs:
            return False
        running = Counter(s.group for s in self.running)
        if not any(count > limit for count in running.values()):
            return False
        return any(running[s.group] < limit for s in self.waiting)

    def _make_room(self) -> set[str]:
        """Fair sharing: the groups with waiting sequences that are under their share (empty if
        none, or if no group is over it). Those that find no free seat each take one from an
        over-share group: its newest running sequence (none with a token in flight) is
        preempted, and comes back when a seat is free and no starved group waits."""
        self._swaps = 0
        limit = self.share_limit
        if limit is None or not self.waiting:
            return set()
        running = Counter(s.group for s in self.running)
        if not any(count > limit for count in running.values()):
            return set()  # nobody over the share: first come, first served
        starved = {g for g in (s.group for s in self.waiting) if running[g] < limit}
        if not starved:
            return starved
        wanting = sum(1 for s in self.waiting if s.group in starved)
        needed = min(wanting, self.config.max_num_seqs)
        needed -= max(0, self.config.max_num_seqs - len(self.running))  # free seats
        i = len(self.running) - 1
        while needed > 0 and i >= 0:
            seq = self.running[i]
            group = seq.group
            if running[group] > limit and not seq.num_pending_tokens:
                del self.running[i]
                self._preempt(seq)
                running[group] -= 1
                needed -= 1
                self._swaps += 1
            i -= 1
        return starved

    def _schedule_waiting(
        self, batch: ScheduledBatch, budget: int, starved: set[str] | None = None
    ) -> None:
        """First come, first served, up to ``max_num_seqs`` running; while ``starved`` groups
        wait, the others' sequences are passed over, and the starved take the seats
        ``_make_room`` freed."""
        bm = self.block_manager
        passed: list[Sequence] = []
        counts = Counter(s.group for s in self.running) if starved else None
        limit = self.share_limit
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            group = seq.group
            if starved and group not in starved:
                passed.append(self.waiting.popleft())
                continue
            # The running batch may exceed max_num_seqs (n > 1 forks its samples after the
            # prompt): a starved sequence then takes a seat _make_room freed.
            swap = len(self.running) >= self.config.max_num_seqs
            if swap and not (starved and self._swaps > 0):
                break
            cached = bm.find_cached_prefix(seq)
            num_cached = len(cached[0]) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate_slots(seq, num_new, cached):
                break
            self.waiting.popleft()
            self._swaps -= swap
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            if starved and counts is not None and limit is not None:
                counts[group] += 1
                if counts[group] >= limit:
                    starved.discard(group)
        self.waiting.extendleft(reversed(passed))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        if self.by_priority:
            self._insert_by_priority(seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished sequence and free its blocks."""
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop every sequence of a request, wherever it is; returns them."""
        dropped = [s for s in self.running if s.request_id == request_id]
        for seq in dropped:
            self.finish(seq)
        waiting = [s for s in self.waiting if s.request_id == request_id]
        for seq in waiting:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
        return dropped + waiting


def _priority_key(seq: Sequence) -> tuple[int, int]:
    """vLLM's order under the priority policy: lower priority value first, then arrival."""
    return seq.priority, seq.seq_id
