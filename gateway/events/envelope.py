"""The public event envelope: `{"kind","event_id","workspace_id","occurred_at","data"}`.

The body is serialised exactly once, here; the outbox stores those bytes and every delivery
attempt sends them unchanged, so a receiver's signature check and dedupe see identical bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import uuid_utils


def uuid7() -> str:
    """An RFC 9562 UUIDv7 string; ids made in order in one process sort in that order.

    uuid_utils keeps a counter in the bits after the millisecond timestamp (RFC 9562 §6.2), so
    ids made in the same millisecond still sort in creation order; it is fork-safe (a forked
    worker's ids do not repeat its parent's) and needs no lock on our side.
    """
    return str(uuid_utils.uuid7())


def rfc3339_ms(dt: datetime) -> str:
    """`2026-06-27T10:05:00.000Z`: UTC, millisecond precision (truncated), `Z` suffix.

    Naive datetimes are refused: guessing their zone would silently shift billing times.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("rfc3339_ms needs a timezone-aware datetime")
    u = dt.astimezone(UTC)
    return u.strftime("%Y-%m-%dT%H:%M:%S.") + f"{u.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Event:
    event_id: str
    kind: str
    workspace_id: str
    occurred_at: str  # rfc3339_ms form
    data: dict[str, Any]  # decoded from `body`, so it is exactly what receivers get
    body: bytes  # the serialised envelope; never re-serialised

    @classmethod
    def from_body(cls, body: bytes) -> Event:
        """Rebuild an Event from stored envelope bytes (the bytes are kept as they are)."""
        obj = json.loads(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("data"), dict):
            raise ValueError("not an event envelope")
        return cls(
            event_id=str(obj["event_id"]),
            kind=str(obj["kind"]),
            workspace_id=str(obj["workspace_id"]),
            occurred_at=str(obj["occurred_at"]),
            data=obj["data"],
            body=body,
        )


def make_event(
    kind: str,
    workspace_id: str,
    data: Mapping[str, Any],
    occurred_at: datetime | None = None,
) -> Event:
    """Build an event with a fresh UUIDv7 id; `occurred_at` defaults to now (UTC)."""
    if not kind:
        raise ValueError("event kind must be non-empty")
    if not workspace_id:
        raise ValueError("workspace_id must be non-empty")
    when = rfc3339_ms(occurred_at if occurred_at is not None else datetime.now(UTC))
    event_id = uuid7()
    envelope = {
        "kind": kind,
        "event_id": event_id,
        "workspace_id": workspace_id,
        "occurred_at": when,
        "data": dict(data),
    }
    # allow_nan=False: NaN/Infinity are not JSON and would break strict receivers
    body = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )
    return Event(
        event_id=event_id,
        kind=kind,
        workspace_id=workspace_id,
        occurred_at=when,
        data=json.loads(body)["data"],  # a detached copy: later edits to `data` cannot drift
        body=body,
    )
