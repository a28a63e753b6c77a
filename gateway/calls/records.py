"""The durable call record store (`storage.dir/calls.sqlite3`): what the API answers about calls
that have ended, their events and recordings, and the create requests' idempotency keys.

Nothing here blocks the event loop: one writer thread (gateway/events/committer.py) owns the
one connection, takes jobs from a queue and runs every job waiting at that moment in ONE
transaction (group commit: one fsync for a burst of events from many calls). Reads go through
the same thread, so a read always sees every write queued before it (and only committed data:
results are handed back after the COMMIT). The node writes fire-and-forget (`note_*`, callable
from any thread); the API awaits (`await records.get(...)`). WAL + synchronous=FULL like the
outbox; the file is created 0600.

Retention: a call, its events and recordings are kept `call_retention_s` (default 7 days) after
their last update; idempotency keys `idempotency_ttl_s` (24 h) after the first request. The
writer thread prunes hourly when idle; `prune()` does it on demand.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from gateway.calls.identity import iso
from gateway.events.committer import Committer, connect_wal
from gateway.events.envelope import Event

__all__ = [
    "FINAL_STATUSES",
    "RECORDING_STATES",
    "CallRecords",
    "IdempotencyRecord",
    "Recording",
    "StoredEvent",
    "sort_key",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

FINAL_STATUSES = frozenset({"completed", "failed", "busy", "no_answer", "canceled", "rejected"})
RecordingState = Literal["in_progress", "ready", "failed"]
RECORDING_STATES: frozenset[str] = frozenset({"in_progress", "ready", "failed"})
CALL_RETENTION_S = 7 * 86400.0
IDEMPOTENCY_TTL_S = 86400.0
_PRUNE_EVERY_S = 3600.0
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    call_id           TEXT PRIMARY KEY,
    workspace_id      TEXT,
    session_id        TEXT,
    parent_call_id    TEXT,
    direction         TEXT,
    from_e164         TEXT,
    to_e164           TEXT,
    local_e164        TEXT,
    remote_e164       TEXT,
    number_id         TEXT,
    client_request_id TEXT,
    status            TEXT,
    started_at        TEXT,
    started_ms        INTEGER NOT NULL,
    answered_at       TEXT,
    ended_at          TEXT,
    duration_seconds  INTEGER,
    failure_code      TEXT,
    sip_code          INTEGER,
    data              TEXT NOT NULL,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_started ON calls (started_ms DESC, call_id DESC);
CREATE INDEX IF NOT EXISTS calls_updated ON calls (updated_at);
CREATE TABLE IF NOT EXISTS call_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    call_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS call_events_call ON call_events (call_id, seq);
CREATE INDEX IF NOT EXISTS call_events_created ON call_events (created_at);
CREATE TABLE IF NOT EXISTS recordings (
    recording_id TEXT PRIMARY KEY,
    call_id      TEXT NOT NULL,
    state        TEXT NOT NULL,
    path         TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS recordings_call ON recordings (call_id, created_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key          TEXT PRIMARY KEY,
    body_hash    TEXT NOT NULL,
    status       INTEGER,
    response     TEXT,
    call_ids     TEXT NOT NULL,
    created_at   REAL NOT NULL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at);
"""

# summary key -> column (the rest of the summary lives in `data` only)
_COLUMNS = {
    "workspace_id": "workspace_id",
    "session_id": "session_id",
    "parent_call_id": "parent_call_id",
    "direction": "direction",
    "from": "from_e164",
    "to": "to_e164",
    "local_e164": "local_e164",
    "remote_e164": "remote_e164",
    "number_id": "number_id",
    "client_request_id": "client_request_id",
    "status": "status",
    "started_at": "started_at",
    "answered_at": "answered_at",
    "ended_at": "ended_at",
    "duration_seconds": "duration_seconds",
    "failure_code": "failure_code",
    "sip_code": "sip_code",
}


def _iso_ms(value: Any) -> int | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return round(dt.timestamp() * 1000)


def sort_key(summary: dict[str, Any]) -> tuple[int, str]:
    """Newest-first order of calls: (started_at in ms, call_id), compared descending. A call
    without a parsable started_at sorts as started at the epoch (last)."""
    call_id = str(summary.get("call_id") or summary.get("id") or "")
    return (_iso_ms(summary.get("started_at")) or 0, call_id)


_FINAL_KINDS = ("call.completed", "call.failed")


def _summary_from_event(event: Event) -> dict[str, Any] | None:
    """The part of a call's summary an event tells (None: it tells nothing about the call)."""
    d = event.data
    out: dict[str, Any] = {"call_id": d["call_id"]}
    if event.kind == "call.started":
        direction = d.get("direction")
        local, remote = (d.get("to"), d.get("from"))
        if direction == "outbound":
            local, remote = remote, local
        out |= {
            "workspace_id": event.workspace_id,
            "direction": direction,
            "from": d.get("from"),
            "to": d.get("to"),
            "local_e164": local,
            "remote_e164": remote,
            "number_id": d.get("number_id"),
            "parent_call_id": d.get("parent_call_id"),
            "client_request_id": d.get("clientRequestId"),
            "status": "ringing",
            "started_at": event.occurred_at,
        }
    elif event.kind == "call.answered":
        out |= {"status": "in-progress", "answered_at": d.get("answered_at") or event.occurred_at}
    elif event.kind in _FINAL_KINDS:
        out |= {
            "status": d.get("status")
            or ("completed" if event.kind == "call.completed" else "failed"),
            "answered_at": d.get("answered_at"),
            "ended_at": d.get("ended_at") or event.occurred_at,
            "duration_seconds": d.get("duration_seconds"),
            "sip_code": d.get("sip_code"),
            "hangup_cause": d.get("hangup_cause"),
            "failure_code": d.get("reason") if event.kind == "call.failed" else None,
        }
    else:
        return None
    return out


@dataclass(frozen=True)
class StoredEvent:
    id: str
    call_id: str
    kind: str
    payload: dict[str, Any]
    occurred_at: str
    created_at: float

    def api(self) -> dict[str, Any]:
        """The SDK's event shape inside `GET /v1/calls/{id}`."""
        return {
            "id": self.id,
            "call_id": self.call_id,
            "kind": self.kind,
            "payload": self.payload,
            "occurred_at": self.occurred_at,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True)
class Recording:
    recording_id: str
    call_id: str
    state: RecordingState
    path: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class IdempotencyRecord:
    key: str
    body_hash: str
    status: int | None  # None: the first request is still in flight (or died in flight)
    response: Any  # the JSON body answered, when status is set
    call_ids: list[str]
    created_at: float

    @property
    def in_flight(self) -> bool:
        return self.status is None


class CallRecords:
    """The store; see the module docstring. Construct, then use; `await close()` at the end."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        call_retention_s: float = CALL_RETENTION_S,
        idempotency_ttl_s: float = IDEMPOTENCY_TTL_S,
        busy_timeout_s: float = 5.0,
        prune_every_s: float = _PRUNE_EVERY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.call_retention_s = call_retention_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self._busy_timeout_s = busy_timeout_s
        self._prune_every_s = prune_every_s
        self.clock = clock
        self._committer = Committer(
            f"call records {self.path}",
            self._connect,
            idle=(prune_every_s, self._prune_fn(None)),
        )

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **kw: Any) -> CallRecords:
        """Construct and wait until the file is open (raises what opening raised)."""
        records = cls(path, **kw)
        await asyncio.wrap_future(records._committer.opened)
        return records

    @staticmethod
    def default_path(storage_dir: str | os.PathLike[str]) -> Path:
        return Path(storage_dir) / "calls.sqlite3"

    def _connect(self) -> sqlite3.Connection:
        return connect_wal(
            self.path, _SCHEMA, _SCHEMA_VERSION, busy_timeout_s=self._busy_timeout_s,
            what="call records",
        )

    def _submit(self, fn: Callable[[sqlite3.Connection], T], what: str) -> asyncio.Future[T]:
        return self._committer.submit(fn, what)

    def _note(self, fn: Callable[[sqlite3.Connection], Any], what: str) -> None:
        self._committer.note(fn, what)

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed."""
        await self._submit(lambda db: None, "flush")

    async def close(self) -> None:
        """Commit what is queued, then close the file. Idempotent."""
        await self._committer.aclose()

    # -- calls ---------------------------------------------------------------------------

    def _upsert_fn(self, summary: dict[str, Any]) -> Callable[[sqlite3.Connection], None]:
        summary = dict(summary)  # the caller may keep mutating its own
        call_id = summary.get("call_id") or summary.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError("a call summary needs a call_id")
        now = self.clock()

        def fn(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT data, created_at FROM calls WHERE call_id = ?", (call_id,)
            ).fetchone()
            old: dict[str, Any] = json.loads(row[0]) if row else {}
            merged = dict(old)
            for key, value in summary.items():
                # A None never erases what is known (a late live summary has no ended_at), and
                # a final status is never replaced by a live one (a late "ringing" from the
                # create response after the node recorded "failed").
                if value is None and old.get(key) is not None:
                    continue
                if key == "status" and old.get("status") in FINAL_STATUSES:
                    if value not in FINAL_STATUSES:
                        continue
                merged[key] = value
            merged["call_id"] = merged["id"] = call_id
            cols = {col: merged.get(key) for key, col in _COLUMNS.items()}
            started_ms = _iso_ms(merged.get("started_at"))
            if started_ms is None:
                started_ms = round((row[1] if row else now) * 1000)
            params = {
                "call_id": call_id,
                **cols,
                "started_ms": started_ms,
                "data": json.dumps(merged, separators=(",", ":"), default=str),
                "created_at": row[1] if row else now,
                "updated_at": now,
            }
            names = ", ".join(params)
            marks = ", ".join(f":{k}" for k in params)
            sets = ", ".join(f"{k} = excluded.{k}" for k in params if k not in ("call_id",))
            db.execute(
                f"INSERT INTO calls ({names}) VALUES ({marks})"
                f" ON CONFLICT (call_id) DO UPDATE SET {sets}",
                params,
            )

        return fn

    async def upsert_call(self, summary: dict[str, Any]) -> None:
        """Store a call's summary (CallIdentity.summary(), or a part of one with call_id):
        merged into what is stored; see `_upsert_fn` for the two rules of the merge."""
        await self._submit(self._upsert_fn(summary), "upsert_call")

    def note_call(self, summary: dict[str, Any]) -> None:
        """`upsert_call`, fire-and-forget (for the node's message handler)."""
        self._note(self._upsert_fn(summary), f"upsert of call {summary.get('call_id')}")

    async def get(self, call_id: str) -> dict[str, Any] | None:
        """The stored summary of a call, or None."""

        def fn(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT data FROM calls WHERE call_id = ?", (call_id,)).fetchone()
            return None if row is None else cast(dict[str, Any], json.loads(row[0]))

        return await self._submit(fn, "get")

    async def list(
        self,
        limit: int = 25,
        cursor: tuple[int, str] | None = None,
        status: Iterable[str] | None = None,
        direction: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored calls, newest first (`sort_key`), those strictly after `cursor` when given."""
        where: list[str] = []
        args: list[Any] = []
        if cursor is not None:
            where.append("(started_ms < ? OR (started_ms = ? AND call_id < ?))")
            args += [cursor[0], cursor[0], cursor[1]]
        statuses = sorted(set(status)) if status is not None else None
        if statuses is not None:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += statuses
        if direction is not None:
            where.append("direction = ?")
            args.append(direction)
        sql = "SELECT data FROM calls"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_ms DESC, call_id DESC LIMIT ?"
        args.append(int(limit))

        def fn(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return [json.loads(r[0]) for r in db.execute(sql, args).fetchall()]

        return await self._submit(fn, "list")

    # -- events --------------------------------------------------------------------------

    def _event_fn(
        self, call_id: str, event_id: str, kind: str, data: dict[str, Any], occurred_at: str
    ) -> Callable[[sqlite3.Connection], bool]:
        payload = json.dumps(data, separators=(",", ":"), default=str)
        now = self.clock()

        def fn(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT INTO call_events (event_id, call_id, kind, payload, occurred_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                (event_id, call_id, kind, payload, occurred_at, now),
            )
            return cur.rowcount == 1

        return fn

    async def add_event(
        self, call_id: str, event_id: str, kind: str, data: dict[str, Any], occurred_at: str
    ) -> bool:
        """Store one of a call's events; False when that event_id is already stored."""
        return await self._submit(
            self._event_fn(call_id, event_id, kind, data, occurred_at), "add_event"
        )

    def note_event(
        self, call_id: str, event_id: str, kind: str, data: dict[str, Any], occurred_at: str
    ) -> None:
        """`add_event`, fire-and-forget."""
        self._note(self._event_fn(call_id, event_id, kind, data, occurred_at), f"event {event_id}")

    def note_call_event(self, event: Event) -> None:
        """Fire-and-forget: a `call.*` event as written to the outbox, stored with its call,
        and the call's record updated from it (started: who and when; answered; the final
        event: status, times, sip_code, hangup_cause, failure_code). The one line the event
        writer needs; events without a call_id are not call records and are skipped."""
        call_id = event.data.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            return
        self.note_event(call_id, event.event_id, event.kind, event.data, event.occurred_at)
        update = _summary_from_event(event)
        if update is not None:
            self.note_call(update)

    async def events(self, call_id: str) -> builtins.list[StoredEvent]:
        """A call's events in the order they were stored."""

        def fn(db: sqlite3.Connection) -> builtins.list[StoredEvent]:
            rows = db.execute(
                "SELECT event_id, call_id, kind, payload, occurred_at, created_at"
                " FROM call_events WHERE call_id = ? ORDER BY seq",
                (call_id,),
            ).fetchall()
            return [StoredEvent(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

        return await self._submit(fn, "events")

    # -- recordings ----------------------------------------------------------------------

    def _recording_fn(
        self, call_id: str, recording_id: str, state: str, path: str | None
    ) -> Callable[[sqlite3.Connection], None]:
        if state not in RECORDING_STATES:
            raise ValueError(f"recording state {state!r} is not one of {sorted(RECORDING_STATES)}")
        now = self.clock()

        def fn(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO recordings (recording_id, call_id, state, path, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (recording_id) DO UPDATE"
                " SET state = excluded.state, path = COALESCE(excluded.path, path),"
                " updated_at = excluded.updated_at",
                (recording_id, call_id, state, path, now, now),
            )

        return fn

    async def set_recording(
        self, call_id: str, recording_id: str, state: str, path: str | None = None
    ) -> None:
        """A recording started (`in_progress`), was written (`ready`) or was lost (`failed`)."""
        await self._submit(self._recording_fn(call_id, recording_id, state, path), "recording")

    def note_recording(
        self, call_id: str, recording_id: str, state: str, path: str | None = None
    ) -> None:
        """`set_recording`, fire-and-forget."""
        self._note(
            self._recording_fn(call_id, recording_id, state, path), f"recording {recording_id}"
        )

    async def recordings(self, call_id: str) -> builtins.list[Recording]:
        """A call's recordings, newest first."""

        def fn(db: sqlite3.Connection) -> builtins.list[Recording]:
            rows = db.execute(
                "SELECT recording_id, call_id, state, path, created_at, updated_at"
                " FROM recordings WHERE call_id = ? ORDER BY created_at DESC, rowid DESC",
                (call_id,),
            ).fetchall()
            return [Recording(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

        return await self._submit(fn, "recordings")

    async def latest_recording(self, call_id: str) -> Recording | None:
        recs = await self.recordings(call_id)
        return recs[0] if recs else None

    async def recording(self, recording_id: str) -> Recording | None:
        def fn(db: sqlite3.Connection) -> Recording | None:
            r = db.execute(
                "SELECT recording_id, call_id, state, path, created_at, updated_at"
                " FROM recordings WHERE recording_id = ?",
                (recording_id,),
            ).fetchone()
            return None if r is None else Recording(r[0], r[1], r[2], r[3], r[4], r[5])

        return await self._submit(fn, "recording")

    # -- idempotency keys ----------------------------------------------------------------

    def _idem_row(self, db: sqlite3.Connection, key: str, now: float) -> IdempotencyRecord | None:
        r = db.execute(
            "SELECT key, body_hash, status, response, call_ids, created_at FROM idempotency"
            " WHERE key = ? AND created_at >= ?",
            (key, now - self.idempotency_ttl_s),
        ).fetchone()
        if r is None:
            return None
        response = None if r[3] is None else json.loads(r[3])
        return IdempotencyRecord(r[0], r[1], r[2], response, json.loads(r[4]), r[5])

    async def idempotency_get(self, key: str) -> IdempotencyRecord | None:
        """The key's record if its first request came within the TTL."""
        return await self._submit(lambda db: self._idem_row(db, key, self.clock()), "idem_get")

    async def idempotency_claim(
        self, key: str, body_hash: str, call_ids: builtins.list[str]
    ) -> IdempotencyRecord | None:
        """Atomically: the key's live record when there is one (the caller replays or refuses),
        else None after storing an in-flight claim (the caller goes on, then `idempotency_put`
        or `idempotency_release`). Two racing requests: exactly one gets None."""

        def fn(db: sqlite3.Connection) -> IdempotencyRecord | None:
            now = self.clock()
            existing = self._idem_row(db, key, now)
            if existing is not None:
                return existing
            db.execute(
                "INSERT OR REPLACE INTO idempotency (key, body_hash, status, response, call_ids,"
                " created_at) VALUES (?, ?, NULL, NULL, ?, ?)",
                (key, body_hash, json.dumps(call_ids), now),
            )
            return None

        return await self._submit(fn, "idem_claim")

    async def idempotency_put(self, key: str, status: int, response: Any) -> None:
        """The answer to the claimed key's request, replayed to every retry within the TTL."""
        body = json.dumps(response, separators=(",", ":"), default=str)

        def fn(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE idempotency SET status = ?, response = ?, completed_at = ? WHERE key = ?",
                (status, body, self.clock(), key),
            )

        await self._submit(fn, "idem_put")

    async def idempotency_release(self, key: str) -> None:
        """Forget an in-flight claim whose request produced nothing to replay (a 5xx)."""
        await self._submit(
            lambda db: db.execute(
                "DELETE FROM idempotency WHERE key = ? AND status IS NULL", (key,)
            ),
            "idem_release",
        )

    # -- retention -----------------------------------------------------------------------

    def _prune_fn(self, now: float | None) -> Callable[[sqlite3.Connection], dict[str, int]]:
        def fn(db: sqlite3.Connection) -> dict[str, int]:
            t = self.clock() if now is None else now
            calls_before = t - self.call_retention_s
            old = "SELECT call_id FROM calls WHERE updated_at < ?"
            counts = {
                "events": db.execute(
                    f"DELETE FROM call_events WHERE call_id IN ({old}) OR created_at < ?",
                    (calls_before, calls_before),
                ).rowcount,
                "recordings": db.execute(
                    f"DELETE FROM recordings WHERE call_id IN ({old}) OR updated_at < ?",
                    (calls_before, calls_before),
                ).rowcount,
                "calls": db.execute(
                    "DELETE FROM calls WHERE updated_at < ?", (calls_before,)
                ).rowcount,
                "idempotency": db.execute(
                    "DELETE FROM idempotency WHERE created_at < ?",
                    (t - self.idempotency_ttl_s,),
                ).rowcount,
            }
            if any(counts.values()):
                log.info("call records pruned: %s", counts)
            return counts

        return fn

    async def prune(self, now: float | None = None) -> dict[str, int]:
        """Delete what is past retention; the number of rows deleted per table."""
        return await self._submit(self._prune_fn(now), "prune")
