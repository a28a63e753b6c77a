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
"""

from __future__ import annotations

import threading
import time
from collections import deque

IOQUEUE_HANDLES = 64  # PJ_IOQUEUE_MAX_HANDLES of the pjsua2 wheel (compiled in; not reachable
# from Python, and pjsua caps SIP transports at 8, so it cannot be probed by filling the queue)
KEY_FREE_DELAY_S = 0.6  # PJ_IOQUEUE_KEY_FREE_DELAY (500 ms) plus a margin
KEYS_PER_CALL = 2  # RTP + RTCP


class Admission:
    def __init__(self, admit: int, *, handles: int = IOQUEUE_HANDLES, fixed: int = 2,
                 tcp_reserve: int = 16) -> None:
        self._lock = threading.Lock()
        self.admit = admit
        # Queue slots INVITEs may use: the rest is for SIP transports and TCP connections.
        self.media_budget = handles - fixed - tcp_reserve
        self.accepting = True  # false while draining or stopping (set by asyncio)
        self.overloaded = False  # the asyncio loop lags (set by asyncio)
        self.inbound = 0  # admitted inbound calls not yet DISCONNECTED
        self.media_calls = 0  # calls (in or out) holding real RTP/RTCP sockets
        self._closed: deque[float] = deque()  # when a call's sockets were closed
        self.refused = 0

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
            if not self.accepting:
                reason = "draining"
            elif self.inbound >= self.admit:
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

    def started(self, inbound: bool) -> None:
        with self._lock:
            self.media_calls += 1
            if inbound:
                self.inbound += 1

    def ended(self, inbound: bool) -> None:
        with self._lock:
            self.media_calls = max(0, self.media_calls - 1)
            if inbound:
                self.inbound = max(0, self.inbound - 1)
            self._closed.append(time.monotonic())

    def churned(self) -> None:
        """An admitted INVITE pjsua refused itself (bad SDP...): its sockets may have churned."""
        with self._lock:
            self._closed.append(time.monotonic())
