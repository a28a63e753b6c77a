"""The supervisor <-> worker protocol: tagged messages (field `t`), validated on receipt.

Coordination only: events themselves go through the SQLite outbox (a worker that dies loses no
event it wrote); the `CallEvent` note here feeds the supervisor's call records and wakes the
deliverer. Commands to calls are `Request`s (with an id) answered by a `Reply` with that id.
The other way, a worker asks the supervisor for what spans processes (a leg placed on another
worker, a room's membership) with an `Ask`, answered by a `Reply` with its id; ids are per
direction (each side's `Requester` counts its own).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from gateway.control.dial_end import EndLeg
from gateway.control.dial_place import PlaceLeg
from gateway.control.dial_progress import LegProgress
from gateway.control.dial_start import StartLeg
from gateway.control.hangup import Hangup
from gateway.control.originate import Destination, Originate
from gateway.control.redirect import Redirect
from gateway.control.respond import Respond
from gateway.control.room_join import RoomJoin
from gateway.control.room_leave import RoomLeave
from gateway.control.room_sync import RoomSync
from gateway.control.stream_stop import StreamStop
from gateway.control.supervise_mode import SuperviseMode
from gateway.control.supervise_start import SuperviseStart
from gateway.control.supervise_stop import SuperviseStop
from gateway.control.supervision_update import SupervisionUpdate


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- supervisor -> worker ----------------------------------------------------------------------
class Stop(_Msg):
    t: Literal["stop"] = "stop"


class Drain(_Msg):
    t: Literal["drain"] = "drain"
    on: bool = True


Op = Annotated[
    Hangup | Redirect | Respond | Originate | RoomSync | StartLeg | LegProgress | EndLeg
    | SuperviseStart | SuperviseMode | SuperviseStop | StreamStop,
    Field(discriminator="op"),
]


class Request(_Msg):
    t: Literal["req"] = "req"
    id: int
    body: Op


# What a worker may ask the supervisor (ops of gateway/control/, tagged by `op`). A union of
# one member until the places that span processes (dial legs, rooms) add theirs.
AskOp = Annotated[
    Hangup | RoomJoin | RoomLeave | PlaceLeg | LegProgress | EndLeg | SupervisionUpdate,
    Field(discriminator="op"),
]


class Ask(_Msg):
    """worker -> supervisor: an op for the supervisor (answered by a `Reply` with this id)."""

    t: Literal["ask"] = "ask"
    id: int
    body: AskOp


# -- worker -> supervisor ----------------------------------------------------------------------
class Ready(_Msg):
    t: Literal["ready"] = "ready"
    worker: int
    max_calls: int
    admit: int
    sip: str


class CallState(_Msg):
    """A call appeared on the worker or changed state (ringing -> in-progress)."""

    t: Literal["call"] = "call"
    identity: dict[str, Any]  # CallIdentity.to_wire()
    status: str  # ringing | in-progress
    answered_at: float | None = None
    trunk: str | None = None  # outbound: the trunk of the current attempt
    # where its events go: the supervisor writes them itself if the worker dies first
    events: Destination | None = None


class CallEnded(_Msg):
    """The call is over on the worker (its final event is written when it had a destination)."""

    t: Literal["ended"] = "ended"
    call_id: str
    status: str  # the final status (completed, failed, busy, no_answer, canceled, rejected)
    answered_at: float | None = None
    ended_at: float
    sip_code: int | None = None
    failure_code: str | None = None
    trunk: str | None = None


class CallEvent(_Msg):
    """An event the worker wrote for a call (kept in the call's record; wakes delivery)."""

    t: Literal["event"] = "event"
    call_id: str
    event_id: str
    kind: str
    data: dict[str, Any]
    occurred_at: str
    stored: bool = True  # False when there was no events destination (logged only)


class Recording(_Msg):
    """A recording began (`in_progress`) or its file is complete (`ready`)."""

    t: Literal["recording"] = "recording"
    call_id: str
    recording_id: str
    state: Literal["in_progress", "ready", "failed"]


# `Metric.name`s (gateway/metrics.py applies them; workers do not import prometheus_client).
SETUP_SECONDS = "setup_seconds"  # value: INVITE received -> 200 OK sent, callback included
CALLBACK_FETCH_SECONDS = "callback_fetch_seconds"  # value: one voice app request; outcome
STREAM_OPENED = "stream_opened"  # a stream fork started; verb: stream | ai_agent
STREAM_ENDED = "stream_ended"  # a stream fork ended; reason: StreamEndReason
ACTION_SKIPPED = "action_skipped"  # a say/play skipped because its media failed; verb, reason


class Metric(_Msg):
    t: Literal["metric"] = "metric"
    name: str
    value: float | None = None
    outcome: str | None = None
    verb: str | None = None
    reason: str | None = None


class Health(_Msg):
    """The worker's event loop started or stopped lagging (it refuses new calls meanwhile)."""

    t: Literal["health"] = "health"
    lagging: bool
    lag_ms: float = 0.0


class Final(_Msg):
    """A call's final status, for the node's metrics."""

    t: Literal["final"] = "final"
    status: str


class Reply(_Msg):
    t: Literal["reply"] = "reply"
    id: int
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    code: str | None = None  # when not ok: call_not_found, call_ended, busy, invalid...
    message: str | None = None


ToWorker = Annotated[Stop | Drain | Request | Reply, Field(discriminator="t")]
FromWorker = Annotated[
    Ready | CallState | CallEnded | CallEvent | Recording | Metric | Health | Final | Reply | Ask,
    Field(discriminator="t"),
]
Message = Stop | Drain | Request | Ready | CallState | CallEnded | CallEvent | Recording | Metric \
    | Health | Final | Reply | Ask

TO_WORKER: TypeAdapter[ToWorker] = TypeAdapter(ToWorker)
FROM_WORKER: TypeAdapter[FromWorker] = TypeAdapter(FromWorker)
