"""The one writer of a call's events: inbound calls, outbound calls, child legs and calls lost
with their worker all write through here, so every `call.*` event has the same base fields and
exactly one final event per call is stored (the outbox's UNIQUE rule decides races)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.calls.identity import CallIdentity, duration_seconds, iso
from gateway.calls.outcome import Outcome
from gateway.control.originate import Destination
from gateway.events.envelope import Event, make_event
from gateway.events.outbox import AsyncOutbox
from gateway.workers.protocol import CallEvent, Recording

log = logging.getLogger(__name__)


def final_data(
    base: dict[str, Any], outcome: Outcome, answered_at: float | None, ended_at: float
) -> dict[str, Any]:
    """The data of the call's final event (`outcome.final_kind`)."""
    if outcome.status == "completed":
        assert answered_at is not None
        return {
            **base,
            "status": "completed",
            "duration_seconds": duration_seconds(answered_at, ended_at),
            "answered_at": iso(answered_at),
            "ended_at": iso(ended_at),
            "hangup_cause": outcome.hangup_cause,
            "sip_code": outcome.sip_code,
        }
    return {
        **base,
        "status": outcome.status,
        "hangup_cause": outcome.hangup_cause,
        "sip_code": outcome.sip_code,
        "reason": outcome.reason,
        "message": outcome.message,
        "answered_at": iso(answered_at),
        "ended_at": iso(ended_at),
    }


def started_data(identity: CallIdentity) -> dict[str, Any]:
    return {**identity.event_base(), "started_at": iso(identity.created_at)}


def answered_data(identity: CallIdentity, answered_at: float | None) -> dict[str, Any]:
    return {**identity.event_base(), "answered_at": iso(answered_at)}


def _size_and_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


class CallEventWriter:
    """Writes one call's events to the durable outbox (the supervisor delivers them).

    Nothing here blocks the loop: `emit` queues the event on the process's outbox writer
    thread and returns a future, True once the event is committed (and fsynced), False when
    the outbox refused it as a second final. `on_event` hears of an event only then (or at
    once, with no destination: only logged): the worker forwards it to the supervisor for the
    call's record and to wake delivery. `settled()` waits until every event emitted so far is
    on disk; a call is over only after that (its final is acknowledged once stored)."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        dest: Destination | None,
        identity: CallIdentity,
        *,
        on_event: Callable[[CallEvent], None] | None = None,
        recording_url: Callable[[str], str] | None = None,
        on_recording: Callable[[Recording], None] | None = None,
        recording_link: Callable[[str], str] | None = None,
    ) -> None:
        self.outbox = outbox
        self.dest = dest
        self.identity = identity
        self.on_event = on_event
        self._recording_url = recording_url
        self._on_recording = on_recording
        self._recording_link = recording_link
        self.final_written = False
        self._last: asyncio.Future[bool] | None = None  # the FIFO's newest: settled when it is
        self._final: tuple[asyncio.Future[bool], str, dict[str, Any]] | None = None
        self.final_retry_s: tuple[float, ...] = (0.5, 2.0, 5.0)  # waits before each retry
        # the final could not be stored even after retries: the worker must not let the call
        # go (the supervisor writes its final once this worker is gone)
        self.on_final_lost: Callable[[], None] | None = None

    @property
    def call_id(self) -> str:
        return self.identity.call_id

    @property
    def base(self) -> dict[str, Any]:
        return self.identity.event_base()

    def emit(self, kind: str, data: dict[str, Any], *, final: bool = False) -> asyncio.Future[bool]:
        event = make_event(kind, self.identity.workspace_id, data)
        if self.dest is None:
            log.info("event %s %s (no events_url configured): %s", kind, event.event_id,
                     event.body.decode())
            self._told(event, stored=False)
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            done.set_result(True)
            return done
        fut = self.outbox.append(
            event, url=self.dest.url, secret=self.dest.secret, policy=self.dest.policy,
            call_id=self.call_id, final=final,
        )
        # registered before anyone awaits `fut`: the supervisor hears of the event before
        # the call's end (worker.untrack) that waits on it
        fut.add_done_callback(lambda f: self._committed(f, event))
        self._last = fut
        return fut

    def _committed(self, fut: asyncio.Future[bool], event: Event) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("call %s: %s %s could not be stored: %s", self.call_id, event.kind,
                      event.event_id, exc)
        elif fut.result():
            log.debug("call %s: %s %s", self.call_id, event.kind, event.event_id)
            self._told(event, stored=True)

    def _told(self, event: Event, *, stored: bool) -> None:
        if self.on_event is not None:
            self.on_event(
                CallEvent(call_id=self.call_id, event_id=event.event_id, kind=event.kind,
                          data=event.data, occurred_at=event.occurred_at, stored=stored)
            )

    async def settled(self) -> bool:
        """Every event emitted so far is committed (or failed: logged in `_committed`).
        False when the final failed to store, again on each of `final_retry_s`: then
        `on_final_lost` has been called and the call must not be let go."""
        last = self._last
        if last is not None:
            await asyncio.wait([last])
        if self._final is None:
            return True
        fut, kind, data = self._final
        for wait in (*self.final_retry_s, None):
            if fut.cancelled() or fut.exception() is None:
                return True  # stored (or refused: the call had its final already)
            if wait is None or self.outbox.committer.dead:
                break  # out of tries, or no writer left to try with
            await asyncio.sleep(wait)
            log.warning("call %s: storing its final %s again", self.call_id, kind)
            fut = self.emit(kind, data, final=True)
            self._final = fut, kind, data
            await asyncio.wait([fut])
        log.error("call %s: its final %s could not be stored; the call stays open",
                  self.call_id, kind)
        if self.on_final_lost is not None:
            self.on_final_lost()
        return False

    # -- the call's life ---------------------------------------------------------------------
    def started(self) -> None:
        self.emit("call.started", started_data(self.identity))

    def answered(self, answered_at: float | None) -> None:
        self.emit("call.answered", answered_data(self.identity, answered_at))

    def final(
        self, outcome: Outcome, *, answered_at: float | None, ended_at: float
    ) -> asyncio.Future[bool]:
        """The call's one final event, queued: True once stored, False if it already had one.
        The call is not over (untracked) before this resolves: see `settled`."""
        if self.final_written:
            refused: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            refused.set_result(False)
            return refused
        self.final_written = True
        data = final_data(self.base, outcome, answered_at, ended_at)
        fut = self.emit(outcome.final_kind, data, final=True)
        self._final = fut, outcome.final_kind, data
        return fut

    def recording_state(self, recording_id: str, state: str) -> None:
        """A recording is being written (the API answers 202 until it is ready) or was lost."""
        if self._on_recording is not None and state in ("in_progress", "failed"):
            self._on_recording(
                Recording(call_id=self.call_id, recording_id=recording_id,
                          state="in_progress" if state == "in_progress" else "failed")
            )

    async def recording_ready(
        self, recording_id: str, path: Path, duration_s: float, fmt: str
    ) -> str:
        """Emit `call.recording.ready` (stored before this returns); the URL the voice app is
        given (RecordingUrl). The file is read and hashed on a thread, not the loop."""
        size, digest = await asyncio.to_thread(_size_and_sha256, path)
        url = self._recording_url(recording_id) if self._recording_url else ""
        stored = self.emit(
            "call.recording.ready",
            {
                "recording_id": recording_id,
                "call_id": self.call_id,
                "duration_seconds": round(duration_s, 3),
                "format": fmt,
                "size_bytes": size,
                "sha256": digest,
                "url": url,
                **({"clientRequestId": self.identity.client_request_id}
                   if self.identity.client_request_id else {}),
            },
        )
        await asyncio.wait([stored])  # a storage failure is logged; the call goes on
        if self._on_recording is not None:
            self._on_recording(
                Recording(call_id=self.call_id, recording_id=recording_id, state="ready")
            )
        # The voice app gets a link that works without the API token, for 15 minutes; the
        # event keeps the API's own URL (the control plane has the token, and events last).
        return self._recording_link(recording_id) if self._recording_link else url
