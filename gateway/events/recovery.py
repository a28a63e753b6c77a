"""Closing the calls a crashed node left open, when the node starts again on the same storage.

A node killed outright (`kill -9`, power loss, OOM) writes no final event for its live calls;
the outbox still holds their `call.started` (and `call.answered`). Before the restarted node
takes calls it gives each such call its final event: `call.failed`, reason `node_lost`. The
node's heartbeat file says when it was last known alive, so `ended_at` is no later than the
crash (at most one heartbeat interval early) and never before the call's last event. The
outbox's UNIQUE final per call keeps it to one final event even if two processes raced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.calls.outcome import CallFacts, Failure, classify
from gateway.calls.writer import final_data
from gateway.events.envelope import Event, make_event, rfc3339_ms
from gateway.events.outbox import Outbox, OutboxRow

log = logging.getLogger(__name__)

HEARTBEAT_NAME = "node-heartbeat.json"
HEARTBEAT_INTERVAL_S = 2.0
NODE_LOST = "node_lost"


@dataclass(frozen=True)
class Heartbeat:
    """One node run: when it began and the last time it was known alive (unix seconds)."""

    pid: int
    started_at: float
    alive_at: float


def read_heartbeat(path: Path) -> Heartbeat | None:
    try:
        obj = json.loads(path.read_text())
        return Heartbeat(int(obj["pid"]), float(obj["started_at"]), float(obj["alive_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_heartbeat(path: Path, hb: Heartbeat) -> None:
    """Atomic replace: a crash mid-write leaves the previous heartbeat, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": hb.pid, "started_at": hb.started_at, "alive_at": hb.alive_at}, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _iso(ts: float) -> str:
    return rfc3339_ms(datetime.fromtimestamp(ts, UTC))


def _ts(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _events(rows: list[OutboxRow]) -> list[Event]:
    out = []
    for r in rows:
        try:
            out.append(Event.from_body(r.body))
        except (ValueError, KeyError):
            log.warning("outbox row %d is not an event envelope; ignored", r.id)
    return out


def lost_call_final(
    rows: list[OutboxRow], heartbeat: Heartbeat | None, now: float
) -> tuple[Event, float]:
    """The `call.failed node_lost` event for an open call, and its ended_at (unix time)."""
    events = _events(rows)
    by_kind: dict[str, dict[str, Any]] = {}
    for e in events:
        by_kind.setdefault(e.kind, e.data)
    started = by_kind.get("call.started") or (events[0].data if events else {})
    answered = by_kind.get("call.answered")
    first_at = min(r.created_at for r in rows)
    last_at = max(r.created_at for r in rows)
    ended = last_at
    # The heartbeat's run is the call's run only if the call began after that run did; a call
    # left by an older run (never recovered) ends at its last event, not hours later.
    if heartbeat is not None and first_at >= heartbeat.started_at:
        ended = max(ended, heartbeat.alive_at)
    ended = min(ended, now)
    # The call's own base fields (as its call.started carried them: clientRequestId and
    # parent_call_id included), and the final from the same classifier and shape as any call's.
    base = {k: v for k, v in started.items() if k != "started_at"}
    base.setdefault("call_id", rows[0].call_id)
    answered_at = _ts(answered.get("answered_at")) if answered else None
    outcome = classify(
        CallFacts(
            direction=started.get("direction") or "inbound",
            answered=answered_at is not None,
            sip_code=200 if answered_at is not None else 503,
            by="local",
            failure=Failure(
                NODE_LOST,
                "the node stopped (crashed or was killed) during the call; ended_at is "
                "the last time it was known alive",
            ),
        )
    )
    data = final_data(base, outcome, answered_at, ended)
    return make_event("call.failed", rows[0].workspace_id, data), ended


def append_final(outbox: Outbox, call_id: str, rows: list[OutboxRow], event: Event) -> bool:
    """Write a final event the gateway decided for a call it lost, to where the call's first
    event went; False when the call already has its final (the outbox's UNIQUE rule)."""
    first = rows[0]
    return outbox.append(
        event,
        url=first.url,
        secret=first.secret,
        policy=first.policy,
        call_id=call_id,
        final=True,
    )


def close_open_calls(outbox: Outbox, heartbeat: Heartbeat | None, now: float) -> list[str]:
    """Write `call.failed node_lost` for every call with events and no final; the call ids
    that got one. Only safe while no worker of this storage is alive (the node's lock)."""
    closed = []
    for call_id in outbox.open_calls():
        rows = outbox.rows_for_call(call_id)
        if not rows:
            continue
        event, ended = lost_call_final(rows, heartbeat, now)
        if append_final(outbox, call_id, rows, event):
            closed.append(call_id)
            log.warning(
                "call %s: call.failed (node_lost), ended_at %s: left open by a node that "
                "stopped without ending it",
                call_id,
                _iso(ended),
            )
    return closed
