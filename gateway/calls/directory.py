"""The node-wide call directory, kept by the supervisor: which worker holds which call, in what
state, and how many pjsua2 call slots each worker has free, so a command finds its call and a
new outbound leg lands on a worker that can hold it.

Fed by the workers' messages (`CallState`, `CallEnded`, `Ready`) and by the supervisor's own
placements: a slot is reserved while an `Originate` is on its way, so two placements racing for
one worker's last slot do not both pick it. The worker's answer is the truth: one that has no
slot after all (an inbound call took it) refuses, and placement moves on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from gateway.calls.identity import CallIdentity
from gateway.control.originate import Destination


@dataclass
class Entry:
    identity: CallIdentity
    worker: int
    status: str
    answered_at: float | None = None
    trunk: str | None = None
    events: Destination | None = None  # where its events go (gateway/calls/lost.py)

    def summary(self) -> dict[str, Any]:
        return self.identity.summary(self.status, self.answered_at)


@dataclass
class WorkerSlots:
    index: int
    max_calls: int
    ready: bool = False
    live: int = 0
    pending: int = 0

    @property
    def free(self) -> int:
        return self.max_calls - self.live - self.pending if self.ready else 0


class CallDirectory:
    def __init__(self) -> None:
        self.calls: dict[str, Entry] = {}
        self.workers: dict[int, WorkerSlots] = {}
        self._changed = asyncio.Event()  # a slot may have come free
        self._next = 0  # where the search for a free worker starts: spreads placements

    # -- workers ----------------------------------------------------------------------------
    def worker_ready(self, index: int, max_calls: int) -> None:
        w = self.workers.setdefault(index, WorkerSlots(index, max_calls))
        w.max_calls, w.ready, w.live, w.pending = max_calls, True, 0, 0
        self._wake()

    def worker_gone(self, index: int) -> list[Entry]:
        """The worker died: its calls leave the directory (returned, for their final events)."""
        w = self.workers.get(index)
        if w is not None:
            w.ready, w.live, w.pending = False, 0, 0
        lost = [e for e in self.calls.values() if e.worker == index]
        for e in lost:
            del self.calls[e.identity.call_id]
        return lost

    # -- calls ------------------------------------------------------------------------------
    def update(self, worker: int, identity: CallIdentity, status: str,
               answered_at: float | None, trunk: str | None = None,
               events: Destination | None = None) -> tuple[Entry, str | None]:
        """The call's entry, and the trunk it was on before this update (None if new)."""
        entry = self.calls.get(identity.call_id)
        if entry is None:
            entry = self.calls[identity.call_id] = Entry(
                identity, worker, status, answered_at, trunk, events
            )
            if (w := self.workers.get(worker)) is not None:
                w.live += 1
            return entry, trunk
        before = entry.trunk
        entry.identity, entry.status, entry.answered_at = identity, status, answered_at
        entry.trunk = trunk
        entry.events = events or entry.events
        return entry, before

    def ended(self, call_id: str) -> Entry | None:
        entry = self.calls.pop(call_id, None)
        if entry is not None and (w := self.workers.get(entry.worker)) is not None:
            w.live = max(0, w.live - 1)
            self._wake()
        return entry

    def get(self, call_id: str) -> Entry | None:
        return self.calls.get(call_id)

    def on_worker(self, index: int) -> list[Entry]:
        return [e for e in self.calls.values() if e.worker == index]

    def summaries(self) -> list[dict[str, Any]]:
        return [e.summary() for e in self.calls.values()]

    def count(self) -> int:
        return len(self.calls)

    # -- placement --------------------------------------------------------------------------
    def reserve(self, exclude: set[int] | frozenset[int] = frozenset(),
                prefer: int | None = None) -> int | None:
        """A worker with a free slot (the one with most free, searching from a rotating start
        so equal workers share the load); its slot is held until `release`. `prefer` (a dial
        leg's home: its media then stays in one bridge) is taken whenever it has a free slot."""
        pw = self.workers.get(prefer) if prefer is not None else None
        if pw is not None and pw.index not in exclude and pw.free > 0:
            pw.pending += 1
            return pw.index
        order = sorted(self.workers)
        if not order:
            return None
        start = self._next % len(order)
        best: WorkerSlots | None = None
        for i in order[start:] + order[:start]:
            w = self.workers[i]
            if i in exclude or w.free <= 0:
                continue
            if best is None or w.free > best.free:
                best = w
        if best is None:
            return None
        self._next = order.index(best.index) + 1
        best.pending += 1
        return best.index

    def release(self, index: int) -> None:
        w = self.workers.get(index)
        if w is not None and w.pending > 0:
            w.pending -= 1
            self._wake()

    def free_slots(self) -> int:
        return sum(w.free for w in self.workers.values())

    async def wait_for_slot(self, timeout: float) -> bool:
        """Wait until something may have freed a slot (True) or `timeout` passed (False)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _wake(self) -> None:
        self._changed.set()
