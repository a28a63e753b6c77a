"""One call's identity: who, where, why. The one source of the event base, the voice callback's
call fields and the API's summary, so the three never disagree (snake_case for events and the
API, camelCase for callbacks, as the product documents them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.events.envelope import rfc3339_ms

Direction = Literal["inbound", "outbound"]


def iso(ts: float | None) -> str | None:
    return None if ts is None else rfc3339_ms(datetime.fromtimestamp(ts, UTC))


def duration_seconds(answered_at: float, ended_at: float) -> int:
    """Whole seconds from answer to end, rounded up (a 12.1 s call is 13 s; billing rounds
    minutes from this)."""
    return max(0, math.ceil(ended_at - answered_at))


@dataclass(frozen=True)
class CallIdentity:
    call_id: str
    direction: Direction
    from_: str  # E.164 (or the caller's raw user part when it is not a number)
    to: str
    number_id: str  # the gateway number on this call: the called one inbound, `from` outbound
    workspace_id: str
    created_at: float  # time.time() at the INVITE (received or sent)
    parent_call_id: str | None = None  # the call a child leg (dial, supervision) belongs to
    client_request_id: str | None = None
    worker: int | None = None
    sip_call_id: str = field(default="", compare=False)
    session_id: str | None = None  # the control plane's session, echoed when it gave one
    # The browser client on the call (`client:<name>`, its token's identity): the caller of a
    # call a browser placed, the callee of a dial to `client:<name>`.
    client: str | None = None
    client_is_caller: bool = False  # the browser placed it: SIP-wise an inbound call

    @property
    def sip_direction(self) -> Direction:
        """Who sent the INVITE: a browser's call billed as `outbound` arrived as one."""
        return "inbound" if self.direction == "inbound" or self.client_is_caller else "outbound"

    def with_(self, **changes: Any) -> CallIdentity:
        return replace(self, **changes)

    @property
    def local_e164(self) -> str:
        return self.to if self.direction == "inbound" else self.from_

    @property
    def remote_e164(self) -> str:
        return self.from_ if self.direction == "inbound" else self.to

    def event_base(self) -> dict[str, Any]:
        """The fields every `call.*` event's data starts with."""
        base: dict[str, Any] = {
            "call_id": self.call_id,
            "direction": self.direction,
            "from": self.from_,
            "to": self.to,
            "number_id": self.number_id,
        }
        if self.parent_call_id is not None:
            base["parent_call_id"] = self.parent_call_id
        if self.client_request_id is not None:
            base["clientRequestId"] = self.client_request_id  # the SDK's spelling, in events too
        if self.client is not None:
            base["client"] = f"client:{self.client}"
        return base

    def callback_fields(self, call_status: str) -> dict[str, str]:
        """The call state POSTed (form or JSON) to the voice app on every fetch."""
        fields = {
            "callId": self.call_id,
            "direction": self.direction,
            "from": self.from_,
            "to": self.to,
            "numberId": self.number_id,
            "workspaceId": self.workspace_id,
            "callStatus": call_status,
        }
        if self.parent_call_id is not None:
            fields["parentCallId"] = self.parent_call_id
        if self.client_request_id is not None:
            fields["clientRequestId"] = self.client_request_id
        if self.client is not None:
            fields["client"] = f"client:{self.client}"
        return fields

    def summary(
        self,
        status: str,
        answered_at: float | None = None,
        ended_at: float | None = None,
    ) -> dict[str, Any]:
        """The API's view of the call (the SDK's `Call` fields the gateway knows)."""
        duration = None
        if answered_at is not None and ended_at is not None:
            duration = duration_seconds(answered_at, ended_at)
        return {
            "id": self.call_id,
            "call_id": self.call_id,
            "workspace_id": self.workspace_id,
            "session_id": self.session_id or self.call_id,
            "parent_call_id": self.parent_call_id,
            "direction": self.direction,
            "from": self.from_,
            "to": self.to,
            "local_e164": self.local_e164,
            "remote_e164": self.remote_e164,
            "number_id": self.number_id,
            "client_request_id": self.client_request_id,
            "status": status,
            "started_at": iso(self.created_at),
            "answered_at": iso(answered_at),
            "ended_at": iso(ended_at),
            "duration_seconds": duration,
            "worker": self.worker,
        }

    def to_wire(self) -> dict[str, Any]:
        """For the worker protocol (JSON)."""
        return {
            "call_id": self.call_id,
            "direction": self.direction,
            "from": self.from_,
            "to": self.to,
            "number_id": self.number_id,
            "workspace_id": self.workspace_id,
            "created_at": self.created_at,
            "parent_call_id": self.parent_call_id,
            "client_request_id": self.client_request_id,
            "worker": self.worker,
            "sip_call_id": self.sip_call_id,
            "session_id": self.session_id,
            "client": self.client,
            "client_is_caller": self.client_is_caller,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CallIdentity:
        return cls(
            call_id=str(d["call_id"]),
            direction=d["direction"],
            from_=str(d["from"]),
            to=str(d["to"]),
            number_id=str(d["number_id"]),
            workspace_id=str(d["workspace_id"]),
            created_at=float(d["created_at"]),
            parent_call_id=d.get("parent_call_id"),
            client_request_id=d.get("client_request_id"),
            worker=d.get("worker"),
            sip_call_id=d.get("sip_call_id") or "",
            client=d.get("client"),
            client_is_caller=bool(d.get("client_is_caller")),
            session_id=d.get("session_id"),
        )
