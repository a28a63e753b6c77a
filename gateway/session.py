"""One call's life in the gateway: events, the voice app, the interpreter, exactly one final event.

The final event is decided from how the SIP call ended (who ended it, with which code, whether it
was answered) plus why the gateway ended it, if it did. It is written the moment the call ends,
independent of whatever the interpreter still does (a recording's upload after a hangup).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dsl.context import CallContext, FetchedDocument, VoiceAppError
from dsl.interpreter import Interpreter
from gateway.events.envelope import Event, make_event, rfc3339_ms, uuid7
from gateway.events.outbox import Outbox
from gateway.leg import SipCallLeg
from gateway.prompts import GatewayPrompts
from gateway.routing import Route
from gateway.voice_app import VoiceAppClient
from media.call import CallEnd, SipCall

log = logging.getLogger(__name__)

# Q.850 cause names, as the seeds' `hangup_cause` spells them.
NORMAL_CLEARING = "normal_clearing"
_CAUSE_BY_CODE = {
    486: "user_busy",
    600: "user_busy",
    603: "call_rejected",
    404: "unallocated_number",
    408: "recovery_on_timer_expire",
    480: "no_user_response",
    487: "originator_cancel",
    500: "normal_temporary_failure",
    503: "normal_temporary_failure",
}


@dataclass(frozen=True)
class Destination:
    url: str
    secret: str
    policy: str  # "control_plane" | "customer"


@dataclass
class Failure:
    reason: str
    message: str


def iso(ts: float | None) -> str | None:
    return None if ts is None else rfc3339_ms(datetime.fromtimestamp(ts, UTC))


class CallEvents:
    """Writes a call's events to the durable outbox; the supervisor delivers them."""

    def __init__(
        self,
        outbox: Outbox,
        dest: Destination | None,
        workspace_id: str,
        call_id: str,
        notify: Callable[[], None],
        recording_url: Callable[[str], str],
        base: dict[str, Any],
    ) -> None:
        self.outbox = outbox
        self.dest = dest
        self.workspace_id = workspace_id
        self.call_id = call_id
        self.notify = notify
        self._recording_url = recording_url
        self.base = base  # call_id, direction, from, to, number_id

    def emit(self, kind: str, data: dict[str, Any], *, final: bool = False) -> bool:
        event = make_event(kind, self.workspace_id, data)
        if self.dest is None:
            log.info(
                "event %s %s (no events_url configured): %s",
                kind,
                event.event_id,
                event.body.decode(),
            )
            return True
        written = self._append(event, final)
        if written:
            log.info("call %s: %s %s", self.call_id, kind, event.event_id)
            self.notify()
        return written

    def _append(self, event: Event, final: bool) -> bool:
        """Commit the event to the outbox. Under heavy write contention SQLite can still report
        `database is locked` after its busy timeout; billing events are worth blocking this
        worker for a while longer rather than dropping them."""
        assert self.dest is not None
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.outbox.append(
                    event,
                    url=self.dest.url,
                    secret=self.dest.secret,
                    policy=self.dest.policy,  # type: ignore[arg-type]
                    call_id=self.call_id,
                    final=final,
                )
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                log.warning("call %s: outbox busy (%s); retrying %s", self.call_id, e, event.kind)
                time.sleep(0.05)

    def recording_ready(self, recording_id: str, path: Path, duration_s: float, fmt: str) -> str:
        import hashlib

        data = path.read_bytes()
        url = self._recording_url(recording_id)
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
            },
        )
        return url


class TimedVoiceApp:
    """The voice app client, with each fetch's latency reported (callback fetch metric)."""

    def __init__(self, inner: VoiceAppClient, observe: Callable[[float, str], None]) -> None:
        self.inner = inner
        self.observe = observe

    async def fetch(
        self, url: str, method: str, extra: Mapping[str, str] | None = None
    ) -> FetchedDocument:
        t0 = time.monotonic()
        try:
            doc = await self.inner.fetch(url, method, extra)
        except VoiceAppError:
            self.observe(time.monotonic() - t0, "error")
            raise
        self.observe(time.monotonic() - t0, "ok")
        return doc


class CallSession:
    def __init__(
        self,
        *,
        call: SipCall,
        route: Route,
        events: CallEvents,
        app: VoiceAppClient | TimedVoiceApp,
        call_fields: dict[str, str],
        prompts: GatewayPrompts,
        recordings_dir: Path,
        started_at: float,
    ) -> None:
        self.call = call
        self.route = route
        self.call_id = events.call_id
        self.events = events
        self.app = app
        self.call_fields = call_fields
        self.prompts = prompts
        self.recordings_dir = recordings_dir
        self.started_at = started_at
        self.failure: Failure | None = None
        self.final_written = False
        self.on_final: Callable[[str], None] | None = None  # the final status, for metrics
        self.on_skip: Callable[[str, str], None] | None = None  # (verb, reason), for metrics
        call.on_answer.append(self._answered)

    def summary(self) -> dict[str, Any]:
        return {
            **self.events.base,
            "workspace_id": self.route.workspace_id,
            "status": "in-progress" if self.call.answered else "ringing",
            "started_at": iso(self.started_at),
            "answered_at": iso(self.call.answered_at),
        }

    def _answered(self) -> None:
        self.call_fields["callStatus"] = "in-progress"
        self.events.emit(
            "call.answered", {**self.events.base, "answered_at": iso(self.call.answered_at)}
        )

    async def run(self) -> None:
        self.events.emit("call.started", {**self.events.base, "started_at": iso(self.started_at)})
        driver = asyncio.create_task(self._drive(), name=f"call-{self.call_id}")
        end = await self.call.wait_ended()
        self.call_fields["callStatus"] = "completed"  # for requests made after the hangup
        self.write_final(end)
        # The interpreter may still have work after a hangup (a recording to hand over).
        try:
            await asyncio.wait_for(asyncio.shield(driver), 30)
        except TimeoutError:
            driver.cancel()
        except Exception:
            log.exception("call %s: driver failed after the call ended", self.call_id)

    async def _drive(self) -> None:
        leg = SipCallLeg(self.call, self.call_id, self.prompts.beep)
        ctx = CallContext(
            leg=leg,
            prompts=self.prompts,
            app=self.app,
            events=self.events,
            voice_callback_url=self.route.voice_callback_url,
            recordings_dir=self.recordings_dir,
            on_skip=self.on_skip,
        )
        try:
            first = await self.app.fetch(
                self.route.voice_callback_url, self.route.voice_callback_method
            )
            if self.call.ended:
                return
            result = await Interpreter(ctx).run(first)
            log.info("call %s: document done (%s)", self.call_id, result.ended_by)
        except VoiceAppError as e:
            log.warning("call %s: voice app failed: %s: %s", self.call_id, e.code, e.message)
            self.fail(e.code, e.message)
        except Exception as e:  # a bug must still end the call cleanly, with its final event
            log.exception("call %s: internal error", self.call_id)
            self.fail("internal_error", f"{type(e).__name__}: {e}")
        finally:
            if not self.call.ended:
                # 500 only reaches the carrier when the call was never answered.
                await self.call.hangup(500 if self.failure else 603)

    def fail(self, reason: str, message: str) -> None:
        if self.failure is None:
            self.failure = Failure(reason, message)

    def write_final(self, end: CallEnd) -> None:
        if self.final_written:
            return
        self.final_written = True
        if self.call.media_failure is not None:  # e.g. sdp_missing (media.call)
            self.fail(*self.call.media_failure)
        status = self._final(end)
        if self.on_final is not None:
            self.on_final(status)

    def _final(self, end: CallEnd) -> str:
        base = self.events.base
        ended_at = iso(end.ended_at)
        if self.failure is None and end.was_answered and self.call.answered_at is not None:
            duration = max(0, math.ceil(end.ended_at - self.call.answered_at))
            self.events.emit(
                "call.completed",
                {
                    **base,
                    "status": "completed",
                    "duration_seconds": duration,
                    "answered_at": iso(self.call.answered_at),
                    "ended_at": ended_at,
                    "hangup_cause": NORMAL_CLEARING,
                },
                final=True,
            )
            return "completed"
        status, cause, reason, message = self._classify(end)
        self.events.emit(
            "call.failed",
            {
                **base,
                "status": status,
                "hangup_cause": cause,
                "sip_code": 200 if end.was_answered else end.sip_code,
                "reason": reason,
                "message": message,
                "answered_at": iso(self.call.answered_at),
                "ended_at": ended_at,
            },
            final=True,
        )
        return status

    def _classify(self, end: CallEnd) -> tuple[str, str, str, str]:
        if not end.was_answered and end.sip_code == 487:
            # What SIP said wins: a CANCEL that raced the gateway's own hangup (fetch still
            # pending, or a failure already noted) still ended the call as 487 canceled.
            return (
                "canceled",
                "originator_cancel",
                "caller_canceled",
                "the caller hung up before the call was answered",
            )
        if self.failure is not None:
            return ("failed", "normal_temporary_failure", self.failure.reason, self.failure.message)
        cause = _CAUSE_BY_CODE.get(end.sip_code, "normal_temporary_failure")
        if end.by == "remote" and not end.was_answered:
            return (
                "failed",
                cause,
                "sip_error",
                f"call ended before answer: {end.sip_code} {end.reason}",
            )
        if end.sip_code in (486, 600):
            return "busy", "user_busy", "rejected_busy", "the voice app rejected the call as busy"
        if end.sip_code == 603:
            return "rejected", "call_rejected", "rejected", "the voice app rejected the call"
        return "failed", cause, "sip_error", f"{end.sip_code} {end.reason}"


def new_call_id() -> str:
    return uuid7()
