"""The node's record of each call's supervision, and its state machine.

One supervision at a time per call (`calls.supervision_in_progress`). States follow the SDK's
`CallSupervision.state`: connecting (the leg is being placed) -> ringing (the supervisor's
phone rings) -> connected (it answered: the tap is on) -> ended; or failed at any point before
connected. A mode change is accepted only while connected (409 while it still rings). Events
(`call.supervision.started|mode_changed|ended|failed`) are handed to `on_event`; the legs
backend (`SupervisionLegs`) places the supervisor's leg and changes what it hears, and reports
progress back through `ringing` / `connected` / `ended` / `failed`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.calls.control import ControlError
from gateway.calls.identity import iso
from gateway.events.envelope import uuid7
from gateway.supervision.request import Announce, Mode, StartSupervision

log = logging.getLogger(__name__)

State = Literal["connecting", "ringing", "connected", "ended", "failed"]
LIVE: frozenset[str] = frozenset({"connecting", "ringing", "connected"})

KEEP_S = 3600.0  # an ended supervision is kept this long for GET
IN_PROGRESS = "calls.supervision_in_progress"
NOT_CONNECTED = "calls.supervision_not_connected"
NOT_FOUND = "calls.supervision_not_found"


@dataclass
class Supervision:
    supervision_id: str
    call_id: str
    session_id: str
    mode: Mode
    announce: Announce
    supervisor: dict[str, Any]
    notify_agent: bool
    label: str | None
    created_at: float = field(default_factory=time.time)
    state: State = "connecting"
    supervisor_leg_id: str | None = None
    connected_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None  # why it ended or failed

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def view(self) -> dict[str, Any]:
        """The SDK's `CallSupervision`."""
        out: dict[str, Any] = {
            "supervision_id": self.supervision_id,
            "call_id": self.call_id,
            "session_id": self.session_id,
            "supervisor_leg_id": self.supervisor_leg_id,
            "mode": self.mode,
            "announce": self.announce,
            "supervisor": self.supervisor,
            "notify_agent": self.notify_agent,
            "state": self.state,
            "connected_at": iso(self.connected_at),
            "ended_at": iso(self.ended_at),
            "created_at": iso(self.created_at),
        }
        if self.label is not None:
            out["label"] = self.label
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    def event_data(self) -> dict[str, Any]:
        return {k: v for k, v in self.view().items() if v is not None}


class SupervisionLegs(Protocol):
    """The node's side: place the supervisor's leg into the supervised bridge, change what it
    hears and who hears it, and take it out."""

    async def start(self, sup: Supervision) -> None:
        """Place the leg (raises ControlError when the call cannot be supervised: 404, 409
        not bridged, 503 capacity); progress comes back through the registry's callbacks."""

    async def set_mode(self, sup: Supervision, mode: Mode) -> None: ...

    async def stop(self, sup: Supervision) -> None:
        """Hang the supervisor's leg up (or CANCEL it); `ended` follows."""


EventSink = Callable[[Supervision, str, dict[str, Any]], None]  # (sup, kind, data)


class Supervisions:
    def __init__(self, legs: SupervisionLegs, on_event: EventSink) -> None:
        self.legs = legs
        self.on_event = on_event
        self._by_call: dict[str, Supervision] = {}  # the call's latest (live or last ended)
        self._by_id: dict[str, Supervision] = {}

    def current(self, call_id: str) -> Supervision | None:
        return self._by_call.get(call_id)

    def get(self, supervision_id: str) -> Supervision | None:
        return self._by_id.get(supervision_id)

    async def start(self, call_id: str, session_id: str, req: StartSupervision) -> Supervision:
        self._prune(time.time())
        prior = self._by_call.get(call_id)
        if prior is not None and prior.live:
            raise ControlError(409, IN_PROGRESS,
                               f"call {call_id} already has a supervisor ({prior.supervision_id})")
        sup = Supervision(
            supervision_id=uuid7(), call_id=call_id, session_id=session_id, mode=req.mode,
            announce=req.announce, supervisor=req.supervisor.model_dump(),
            notify_agent=req.notify_agent, label=req.label,
        )
        self._by_call[call_id] = sup
        self._by_id[sup.supervision_id] = sup
        try:
            await self.legs.start(sup)
        except BaseException:
            # nothing was placed: as if never asked (a retry with the same key may go on)
            if self._by_call.get(call_id) is sup:
                if prior is not None:
                    self._by_call[call_id] = prior
                else:
                    del self._by_call[call_id]
            self._by_id.pop(sup.supervision_id, None)
            raise
        return sup

    async def change(self, call_id: str, mode: Mode) -> Supervision:
        sup = self._by_call.get(call_id)
        if sup is None or not sup.live:
            raise ControlError(404, NOT_FOUND, f"call {call_id} has no supervision in progress")
        if sup.state != "connected":
            raise ControlError(409, NOT_CONNECTED,
                               f"the supervisor is still {sup.state}: change the mode once "
                               "connected")
        if mode != sup.mode:
            await self.legs.set_mode(sup, mode)
            previous, sup.mode = sup.mode, mode
            self.on_event(sup, "call.supervision.mode_changed",
                          {**sup.event_data(), "previous_mode": previous})
        return sup

    async def end(self, call_id: str) -> Supervision | None:
        """Idempotent: the supervision as it is after asking it to end (None: never had one)."""
        sup = self._by_call.get(call_id)
        if sup is None or not sup.live:
            return sup
        await self.legs.stop(sup)
        if sup.live:  # the leg's end has not been reported yet: it is ending, say so now
            self.ended(sup.supervision_id, "api")
        return sup

    # -- progress from the legs backend --------------------------------------------------------
    def placed(self, supervision_id: str, leg_id: str) -> None:
        sup = self._by_id.get(supervision_id)
        if sup is not None and sup.live:
            sup.supervisor_leg_id = leg_id

    def ringing(self, supervision_id: str) -> None:
        sup = self._by_id.get(supervision_id)
        if sup is not None and sup.state == "connecting":
            sup.state = "ringing"

    def connected(self, supervision_id: str, at: float | None = None) -> None:
        sup = self._by_id.get(supervision_id)
        if sup is None or sup.state not in ("connecting", "ringing"):
            return
        sup.state = "connected"
        sup.connected_at = at or time.time()
        self.on_event(sup, "call.supervision.started", sup.event_data())

    def ended(self, supervision_id: str, reason: str) -> None:
        """The leg or the supervised call ended: `ended` once connected, else `failed`."""
        sup = self._by_id.get(supervision_id)
        if sup is None or not sup.live:
            return
        was_connected = sup.state == "connected"
        sup.state = "ended" if was_connected else "failed"
        sup.ended_at = time.time()
        sup.reason = reason
        kind = "call.supervision.ended" if was_connected else "call.supervision.failed"
        log.info("supervision %s of call %s: %s (%s)", sup.supervision_id, sup.call_id,
                 sup.state, reason)
        self.on_event(sup, kind, sup.event_data())

    def _prune(self, now: float) -> None:
        """Drop supervisions over for KEEP_S (GET answers from memory only while it is
        useful; the events are the record)."""
        for sid, sup in list(self._by_id.items()):
            if not sup.live and sup.ended_at is not None and now - sup.ended_at > KEEP_S:
                del self._by_id[sid]
                if self._by_call.get(sup.call_id) is sup:
                    del self._by_call[sup.call_id]

    def forget(self, call_id: str) -> None:
        """The supervised call is over and reported: drop its record."""
        sup = self._by_call.pop(call_id, None)
        if sup is not None:
            self._by_id.pop(sup.supervision_id, None)
