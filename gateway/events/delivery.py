"""Delivers outbox rows over HTTP: at-least-once, signed afresh at every attempt.

One Deliverer per outbox file (the supervisor's). It polls as well as waking on `notify()`,
because other processes append to the same file; it reads and marks rows through the outbox's
writer thread, never on its loop. A row is only changed after its attempt
ends, so rows a crashed deliverer left mid-attempt are simply due again; receivers dedupe on
event_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, replace

import aiohttp
from yarl import URL

from gateway.events.outbox import AsyncOutbox, Outbox, OutboxRow, Policy
from gateway.events.signing import SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "X-Sautikit-Idempotency-Key"
EVENT_HEADER = "X-Sautikit-Event"
_MAX_EXPONENT = 30  # 2**30 units is already far past any cap; avoids huge ints


def redact_url(url: str) -> str:
    """The URL without credentials or query string (either may carry a customer's token)."""
    try:
        u = URL(url)
    except ValueError:
        return "<invalid url>"
    if u.user is not None or u.password is not None:
        u = u.with_user(None)
    text = str(u.with_query(None).with_fragment(None))
    return text + "?…" if u.query_string else text


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    reason: str  # "" when ok
    permanent: bool = False  # a rejection that repeating the same request cannot fix


def is_permanent_status(status: int) -> bool:
    """4xx other than 408 (timeout) and 429 (rate limit): the receiver refuses this request."""
    return 400 <= status < 500 and status not in (408, 429)


def next_delay(
    policy: Policy,
    attempts_done: int,
    result: AttemptResult,
    *,
    backoff_unit_s: float,
    customer_attempts: int,
    control_plane_cap_s: float,
) -> float | None:
    """Seconds until the next attempt after `attempts_done` failures, or None: dead letter.

    customer: the public schedule, `customer_attempts` tries spaced 1, 2, 4, 8 units; any
    non-2xx counts. control_plane (billing): retry until accepted, 1, 2, 4 … capped at
    `control_plane_cap_s` units; only a permanent rejection gives up.
    """
    step = float(2 ** min(max(attempts_done - 1, 0), _MAX_EXPONENT))
    if policy == "customer":
        if attempts_done >= customer_attempts:
            return None
        return step * backoff_unit_s
    if result.permanent:
        return None
    return min(step, control_plane_cap_s) * backoff_unit_s


class Deliverer:
    """Sends due rows, at most `max_in_flight` at once, and records each attempt's outcome.

    Rows are held in memory (up to `max_known`), ordered by when they are due, so a failed
    attempt is retried at its backoff without asking the database. The database is asked
    only for what it alone knows, on the outbox's writer thread (never on the loop): at start
    and every `max(poll_interval_s, 1 s)` a full look at pending rows (a restart, rows beyond
    `max_known`, dead letters an operator retried from another process); on `notify()` and at
    each poll, the rows appended since the last look (by id: other processes append too).
    Delivery and failure marks are queued on the writer thread, group-committed.

    `outbox`: the process's `AsyncOutbox`; given a plain `Outbox` (tools, tests), the
    Deliverer opens its own writer thread on that file for as long as it runs.
    """

    def __init__(
        self,
        outbox: AsyncOutbox | Outbox,
        session: aiohttp.ClientSession,
        *,
        timeout_s: float = 10.0,
        max_in_flight: int = 16,
        backoff_unit_s: float = 1.0,
        poll_interval_s: float = 0.5,
        customer_attempts: int = 5,
        control_plane_cap_s: float = 60.0,
        max_known: int = 1000,
    ) -> None:
        if timeout_s <= 0 or backoff_unit_s <= 0 or poll_interval_s <= 0:
            raise ValueError("timeout_s, backoff_unit_s and poll_interval_s must be positive")
        if max_in_flight < 1 or customer_attempts < 1 or control_plane_cap_s < 1:
            raise ValueError("max_in_flight, customer_attempts, control_plane_cap_s must be >= 1")
        if max_known < max_in_flight:
            raise ValueError("max_known must be at least max_in_flight")
        self._given = outbox
        self._outbox: AsyncOutbox | None = outbox if isinstance(outbox, AsyncOutbox) else None
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._unit = backoff_unit_s
        self._poll = poll_interval_s
        self._rescan = max(poll_interval_s, 1.0)
        self._customer_attempts = customer_attempts
        self._cap = control_plane_cap_s
        self._max_known = max_known
        self._wake = asyncio.Event()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._known: dict[int, OutboxRow] = {}  # pending, not in flight
        self._due: list[tuple[float, int]] = []  # heap of (next_attempt_at, id) over _known
        self._tail = 0  # the highest row id looked at
        self._new = False  # notified since the last look
        self._next_poll = 0.0  # monotonic times of the next look for new rows...
        self._next_scan = 0.0  # ...and of the next full look
        self._stopping = False
        self._started = False
        self._finished = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def notify(self) -> None:
        """Something was appended: look now instead of at the next poll. Thread-safe."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._notified)
        else:
            self._notified()

    def _notified(self) -> None:
        self._new = True
        self._wake.set()

    async def stop(self) -> None:
        """Stop taking rows, let attempts in flight finish (bounded by the timeout)."""
        self._stopping = True
        self.notify()
        if self._started:
            await self._finished.wait()

    async def run(self) -> None:
        """Deliver until stopped or cancelled."""
        if self._started:
            raise RuntimeError("Deliverer.run() may only be called once")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        own = self._outbox is None
        try:
            if self._outbox is None:
                self._outbox = await AsyncOutbox.open(self._given.path)
            while not self._stopping:
                self._wake.clear()
                delay = await self._fill()
                if delay > 0 and not self._stopping:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
        finally:
            await self._drain(graceful=self._stopping)
            if own and self._outbox is not None:
                await self._outbox.aclose()
            self._finished.set()

    async def _drain(self, *, graceful: bool) -> None:
        tasks = list(self._in_flight.values())
        if not tasks:
            return
        if graceful:
            await asyncio.wait(tasks, timeout=self._timeout_s + 1.0)
        # anything still running stays pending in the outbox and is sent again later
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- what is due -------------------------------------------------------------------------

    def _hold(self, row: OutboxRow, *, attempted: bool = False) -> None:
        """Keep `row` for its next attempt (`attempted`: from the outcome of its last one)."""
        if row.id in self._in_flight and not attempted:
            return  # its attempt's outcome decides what happens to it
        held = self._known.get(row.id)
        self._known[row.id] = row
        if held is not None and held.next_attempt_at == row.next_attempt_at:
            return  # already in the heap
        heapq.heappush(self._due, (row.next_attempt_at, row.id))

    def _room(self) -> int:
        """Rows a look may add: in flight ones come back to `_known` after their attempt."""
        return self._max_known - len(self._known) - len(self._in_flight)

    async def _look(self) -> None:
        """Ask the database for what only it knows (see the class docstring)."""
        assert self._outbox is not None
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = self._next_poll = now + self._rescan
            self._new = False
            limit = self._max_known
            tail, rows = await self._outbox.run(
                lambda ob: (ob.max_id(), ob.due(math.inf, limit)), "deliverer scan", read=True
            )
            room = self._room()
            for row in rows:
                if row.id in self._known or row.id in self._in_flight:
                    self._hold(row)  # re-read: its newest next_attempt_at
                elif room > 0:  # bounded: the rest wait in the database for a later scan
                    room -= 1
                    self._hold(row)
            self._tail = max(self._tail, tail)
            if len(self._due) > 2 * len(self._known) + 64:
                # mostly stale entries (rows attempted or re-read since): rebuild
                self._due = [(r.next_attempt_at, r.id) for r in self._known.values()]
                heapq.heapify(self._due)
        elif self._new or now >= self._next_poll:
            self._next_poll = now + self._poll
            room = self._room()
            if room <= 0:
                return  # the new rows wait in the database until there is room
            self._new = False
            rows = await self._outbox.pending_after(self._tail, room)
            for row in rows:
                self._hold(row)
                self._tail = max(self._tail, row.id)
            if len(rows) == room:
                self._new = True  # there may be more: look again once there is room

    async def _fill(self) -> float:
        """Start attempts for due rows; return how long to sleep before looking again."""
        try:
            await self._look()
        except (sqlite3.Error, RuntimeError):
            log.exception("outbox read failed; retrying in %.1fs", self._poll)
            return self._poll
        now = time.time()
        while self._due and len(self._in_flight) < self._max_in_flight and not self._stopping:
            at, row_id = self._due[0]
            row = self._known.get(row_id)
            if row is None or row.next_attempt_at != at:
                heapq.heappop(self._due)  # stale: attempted or re-read since
                continue
            if at > now:
                break
            heapq.heappop(self._due)
            del self._known[row_id]
            self._in_flight[row_id] = asyncio.create_task(
                self._attempt(row), name=f"deliver-{row.event_id}"
            )
        mono = time.monotonic()
        wait = max(0.0, min(self._next_poll, self._next_scan) - mono)
        if len(self._in_flight) >= self._max_in_flight:
            return wait  # a finishing attempt wakes us sooner
        while self._due:
            at, row_id = self._due[0]
            row = self._known.get(row_id)
            if row is not None and row.next_attempt_at == at:
                return max(0.0, min(wait, at - now))
            heapq.heappop(self._due)
        return wait

    async def _attempt(self, row: OutboxRow) -> None:
        try:
            try:
                result = await self._post(row)
            except Exception as e:  # never let one row kill the loop
                log.exception("unexpected error delivering event %s", row.event_id)
                result = AttemptResult(False, f"internal error: {type(e).__name__}")
            await self._record(row, result)
        finally:
            self._in_flight.pop(row.id, None)
            self._wake.set()

    async def _post(self, row: OutboxRow) -> AttemptResult:
        headers = {
            "Content-Type": "application/json",
            # a fresh t per attempt: a backlog sent after a long outage still passes the
            # receiver's 5-minute replay window
            SIGNATURE_HEADER: sign(row.secret, row.body),
            IDEMPOTENCY_HEADER: row.event_id,
            EVENT_HEADER: row.kind,
        }
        try:
            async with self._session.post(
                row.url,
                data=row.body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
            ) as resp:
                if 200 <= resp.status < 300:
                    return AttemptResult(True, "")
                snippet = ""
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    raw = await resp.content.read(200)
                    snippet = raw.decode("utf-8", "replace").strip()
                reason = f"HTTP {resp.status}" + (f": {snippet}" if snippet else "")
                return AttemptResult(False, reason, permanent=is_permanent_status(resp.status))
        except TimeoutError:
            return AttemptResult(False, f"timeout after {self._timeout_s:g}s")
        except aiohttp.InvalidURL:
            return AttemptResult(False, "invalid destination URL", permanent=True)
        except (aiohttp.ClientError, OSError) as e:
            return AttemptResult(False, f"{type(e).__name__}: {e}")

    async def _record(self, row: OutboxRow, result: AttemptResult) -> None:
        """Mark the attempt's outcome (queued on the writer thread, awaited: the row is not
        taken again before its mark is on disk) and hold the row again if it is still due."""
        assert self._outbox is not None
        if result.ok:
            try:
                await self._outbox.mark_delivered(row.id)
            except (sqlite3.Error, RuntimeError):
                # the row stays pending and is sent again: at-least-once
                log.exception("could not record the delivery of event %s", row.event_id)
                self._hold(replace(row, next_attempt_at=time.time() + self._poll), attempted=True)
                return
            log.debug(
                "delivered event %s (%s) attempt %d", row.event_id, row.kind, row.attempts + 1
            )
            return
        done = row.attempts + 1
        delay = next_delay(
            row.policy,
            done,
            result,
            backoff_unit_s=self._unit,
            customer_attempts=self._customer_attempts,
            control_plane_cap_s=self._cap,
        )
        next_at = None if delay is None else time.time() + delay
        try:
            await self._outbox.mark_failed(row.id, result.reason, next_at)
        except (sqlite3.Error, RuntimeError):
            # the row stays as it was and is attempted again: at-least-once
            log.exception("could not record the outcome for event %s", row.event_id)
            self._hold(replace(row, next_attempt_at=time.time() + self._poll), attempted=True)
            return
        if next_at is None:
            log.warning(
                "event %s (%s) to %s moved to dead_letter after %d attempt(s): %s",
                row.event_id,
                row.kind,
                redact_url(row.url),
                done,
                result.reason,
            )
            return
        self._hold(
            replace(row, attempts=done, last_error=result.reason, next_attempt_at=next_at),
            attempted=True,
        )
        log.info(
            "event %s (%s) attempt %d failed (%s); next in %.2fs",
            row.event_id,
            row.kind,
            done,
            result.reason,
            delay,
        )
