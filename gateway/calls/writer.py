"""The one writer of a call's events: inbound calls, outbound calls, child legs and calls lost
with their worker all write through here, so every `call.*` event has the same base fields and
exactly one final event per call is stored (the outbox's UNIQUE rule decides races)."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.calls.identity import CallIdentity, duration_seconds, iso
from gateway.calls.outcome import Outcome
from gateway.control.originate import Destination
from gateway.events.envelope import Event, make_event
from gateway.events.outbox import Outbox
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


class CallEventWriter:
    """Writes one call's events to the durable outbox (the supervisor delivers them).

    `on_event` hears of every event (stored or, without a destination, only logged): the worker
    forwards it to the supervisor for the call's record and to wake delivery."""

    def __init__(
        self,
        outbox: Outbox,
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

    @property
    def call_id(self) -> str:
        return self.identity.call_id

    @property
    def base(self) -> dict[str, Any]:
        return self.identity.event_base()

    def emit(self, kind: str, data: dict[str, Any], *, final: bool = False) -> bool:
        event = make_event(kind, self.identity.workspace_id, data)
        if self.dest is None:
            log.info("event %s %s (no events_url configured): %s", kind, event.event_id,
                     event.body.decode())
            written = True
        else:
            written = self._append(event, final)
            if written:
                log.debug("call %s: %s %s", self.call_id, kind, event.event_id)
        if written and self.on_event is not None:
            self.on_event(
                CallEvent(call_id=self.call_id, event_id=event.event_id, kind=kind,
                          data=event.data, occurred_at=event.occurred_at,
                          stored=self.dest is not None)
            )
        return written

    def _append(self, event: Event, final: bool) -> bool:
        """Commit the event. Under heavy write contention SQLite can still report `database is
        locked` after its busy timeout; a billing event is worth blocking a while longer."""
        assert self.dest is not None
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.outbox.append(
                    event, url=self.dest.url, secret=self.dest.secret, policy=self.dest.policy,
                    call_id=self.call_id, final=final,
                )
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                log.warning("call %s: outbox busy (%s); retrying %s", self.call_id, e, event.kind)
                time.sleep(0.05)

    # -- the call's life ---------------------------------------------------------------------
    def started(self) -> None:
        self.emit("call.started", {**self.base, "started_at": iso(self.identity.created_at)})

    def answered(self, answered_at: float | None) -> None:
        self.emit("call.answered", {**self.base, "answered_at": iso(answered_at)})

    def final(self, outcome: Outcome, *, answered_at: float | None, ended_at: float) -> bool:
        """The call's one final event; False if it already had one."""
        if self.final_written:
            return False
        self.final_written = True
        return self.emit(outcome.final_kind, final_data(self.base, outcome, answered_at, ended_at),
                         final=True)

    def recording_state(self, recording_id: str, state: str) -> None:
        """A recording is being written (the API answers 202 until it is ready) or was lost."""
        if self._on_recording is not None and state in ("in_progress", "failed"):
            self._on_recording(
                Recording(call_id=self.call_id, recording_id=recording_id,
                          state="in_progress" if state == "in_progress" else "failed")
            )

    def recording_ready(self, recording_id: str, path: Path, duration_s: float, fmt: str) -> str:
        """Emit `call.recording.ready`; the URL the voice app is given (RecordingUrl)."""
        data = path.read_bytes()
        url = self._recording_url(recording_id) if self._recording_url else ""
        self.emit(
            "call.recording.ready",
            {
                "recording_id": recording_id,
                "call_id": self.call_id,
                "duration_seconds": round(duration_s, 3),
                "format": fmt,
                "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "url": url,
                **({"clientRequestId": self.identity.client_request_id}
                   if self.identity.client_request_id else {}),
            },
        )
        if self._on_recording is not None:
            self._on_recording(
                Recording(call_id=self.call_id, recording_id=recording_id, state="ready")
            )
        # The voice app gets a link that works without the API token, for 15 minutes; the
        # event keeps the API's own URL (the control plane has the token, and events last).
        return self._recording_link(recording_id) if self._recording_link else url
