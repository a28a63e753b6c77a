"""Admission of inbound INVITEs, decided in pjsua's own thread before any socket is opened.

Why here and not in asyncio: pjsua opens a call's RTP and RTCP sockets (two slots of its
`select()` I/O queue, PJ_IOQUEUE_MAX_HANDLES = 64 in this build) *before* `onIncomingCall`
runs, and closes them at DISCONNECTED. A closed socket's queue slot only returns to the free
list PJ_IOQUEUE_KEY_FREE_DELAY (500 ms) later. A burst of INVITEs that asyncio refuses one by
one (503 at a full worker, 404 at unknown numbers) therefore churns slots faster than they come
back; once the free list is empty, `pj_ioqueue_register_sock2` asserts and the worker aborts.
`Endpoint.onSelectAccount` runs before the dialog and media are created: the gate decides there
and sends refused calls to an account with a loop media transport (no socket), which answers
503 at once. This object is shared by the pump thread and asyncio: every field under `_lock`.

Inbound and outbound calls share pjsua's call slots (`max_calls`, 4 in the PyPI wheel). An
INVITE that finds every slot taken is answered 486 by pjsua itself, before `onSelectAccount`
(so before this gate) runs (seen with this wheel: 4 outbound calls up, an INVITE got 486), and
a front takes a 486 for a busy callee or a full worker. So while any outbound call is up the
last slot is kept for refusals: an outbound call is only placed while two slots are free
(`start_outbound`), and an inbound INVITE that would take the last slot is refused 503 by the
gate. Without outbound calls `admit` alone limits inbound calls, as before (it may equal
`max_calls`: the INVITE beyond gets pjsua's 486, which the front fails over).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque

IOQUEUE_HANDLES = 64  # PJ_IOQUEUE_MAX_HANDLES of the pjsua2 wheel (compiled in; not reachable
# from Python, and pjsua caps SIP transports at 8, so it cannot be probed by filling the queue)
KEY_FREE_DELAY_S = 0.6  # PJ_IOQUEUE_KEY_FREE_DELAY (500 ms) plus a margin
KEYS_PER_CALL = 2  # RTP + RTCP
# An outbound INVITE cancelled before any response (not even 100 Trying) keeps its pjsua call
# slot after DISCONNECTED: PJSIP may only send the CANCEL once a response comes (RFC 3261 9.1),
# so the INVITE transaction lives on until Timer B (64 x T1 = 32 s after the INVITE) ends it.
# Seen with this wheel: a 4-slot endpoint took 3 calls, then 4 again 32.1 s later.
TIMER_B_S = 32.0 + 1.0


class Admission:
    def __init__(self, admit: int, *, max_calls: int = 0, handles: int = IOQUEUE_HANDLES,
                 fixed: int = 2, tcp_reserve: int = 16) -> None:
        self._lock = threading.Lock()
        self.admit = admit
        # pjsua call slots, inbound and outbound together; 0: not known, no limit but `admit`.
        self.max_calls = max_calls
        # Queue slots INVITEs may use: the rest is for SIP transports and TCP connections.
        self.media_budget = handles - fixed - tcp_reserve
        self.accepting = True  # false while draining or stopping (set by asyncio)
        self.overloaded = False  # the asyncio loop lags (set by asyncio)
        self.inbound = 0  # admitted inbound calls not yet DISCONNECTED
        self.outbound = 0  # outbound calls placed, not yet DISCONNECTED
        self.media_calls = 0  # calls (in or out) holding real RTP/RTCP sockets
        self._closed: deque[float] = deque()  # when a call's sockets were closed
        self._held: list[float] = []  # heap: when an ended outbound call's slot frees (Timer B)
        self.refused = 0

    def _release_held(self, now: float) -> None:
        while self._held and self._held[0] <= now:
            heapq.heappop(self._held)
            self.media_calls = max(0, self.media_calls - 1)
            self.outbound = max(0, self.outbound - 1)

    def _closing(self, now: float) -> int:
        while self._closed and now - self._closed[0] > KEY_FREE_DELAY_S:
            self._closed.popleft()
        return len(self._closed)

    def keys_in_use(self) -> int:
        with self._lock:
            return KEYS_PER_CALL * (self.media_calls + self._closing(time.monotonic()))

    def decide(self) -> str | None:
        """None to admit, else why the INVITE is refused (pump thread)."""
        with self._lock:
            self._release_held(time.monotonic())
            if not self.accepting:
                reason = "draining"
            elif self.inbound >= self.admit or (
                self.max_calls and self.outbound > 0 and self.media_calls >= self.max_calls - 1
            ):
                reason = "full"
            elif self.overloaded:
                reason = "overloaded"
            elif (KEYS_PER_CALL * (self.media_calls + self._closing(time.monotonic()) + 1)
                  > self.media_budget):
                reason = "sockets"
            else:
                return None
            self.refused += 1
            return reason

    def start_outbound(self, *, last_slot: bool = False) -> bool:
        """Count an outbound call about to be placed (asyncio thread); False, nothing counted,
        when it would leave no slot for refusals. `last_slot`: it may take the last one (a dial
        leg of a call on this process; new INVITEs then get pjsua's own 486 until one ends)."""
        with self._lock:
            self._release_held(time.monotonic())
            if self.max_calls and self.media_calls >= self.max_calls - (0 if last_slot else 1):
                return False
            self.media_calls += 1
            self.outbound += 1
            return True

    def free_slots(self) -> int:
        """Outbound calls this process can place now (one slot always kept for refusals); -1
        when `max_calls` is not known."""
        with self._lock:
            self._release_held(time.monotonic())
            if not self.max_calls:
                return -1
            return max(0, self.max_calls - 1 - self.media_calls)

    def started(self, inbound: bool) -> None:
        with self._lock:
            self.media_calls += 1
            if inbound:
                self.inbound += 1
            else:
                self.outbound += 1

    def ended(self, inbound: bool, *, slot_held_until: float | None = None) -> None:
        """A call is DISCONNECTED. `slot_held_until` (time.monotonic()): pjsua keeps its call
        slot until then (see TIMER_B_S); it stays in `media_calls` meanwhile (its sockets,
        closed now, are counted until then too: a harmless overestimate)."""
        with self._lock:
            if slot_held_until is not None and slot_held_until > time.monotonic():
                heapq.heappush(self._held, slot_held_until)
                return
            self.media_calls = max(0, self.media_calls - 1)
            if inbound:
                self.inbound = max(0, self.inbound - 1)
            else:
                self.outbound = max(0, self.outbound - 1)
            self._closed.append(time.monotonic())

    def churned(self) -> None:
        """An admitted INVITE pjsua refused itself (bad SDP...): its sockets may have churned."""
        with self._lock:
            self._closed.append(time.monotonic())
