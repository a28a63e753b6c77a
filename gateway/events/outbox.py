"""The durable outbox: every event is committed to SQLite before anyone is told it exists.

One file (`storage.dir/outbox.sqlite3`) is shared by processes on the same host: worker
processes append, one supervisor process runs the Deliverer. WAL mode lets readers and the
single writer proceed together. Each process writes through its one writer thread
(`AsyncOutbox`): what its calls queue meanwhile goes in one transaction, one fsync; when two
processes collide, `busy_timeout` (and the thread's retry) waits on that thread, never on an
event loop. `Outbox` is the same store as plain synchronous calls, for tools and tests. Not for
network filesystems (WAL needs shared memory).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from yarl import URL

from gateway.events.committer import Committer, connect_wal
from gateway.events.envelope import Event

Policy = Literal["control_plane", "customer"]
State = Literal["pending", "delivered", "dead_letter"]
POLICIES: frozenset[str] = frozenset({"control_plane", "customer"})
STATES: tuple[State, ...] = ("pending", "delivered", "dead_letter")
_MAX_ERROR_CHARS = 500
T = TypeVar("T")
_SCHEMA_VERSION = 1
PRUNE_CHUNK = 500  # rows deleted per transaction when pruning

# final_call_id is NULL for ordinary events and equals call_id for the call's final event;
# NULLs never collide in a UNIQUE index, so that index alone enforces "one final per call",
# across processes, inside SQLite's own write lock.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL UNIQUE,
    kind            TEXT    NOT NULL,
    call_id         TEXT,
    final_call_id   TEXT,
    workspace_id    TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    url             TEXT    NOT NULL,
    secret          TEXT    NOT NULL,
    policy          TEXT    NOT NULL CHECK (policy IN ('control_plane', 'customer')),
    state           TEXT    NOT NULL DEFAULT 'pending'
                            CHECK (state IN ('pending', 'delivered', 'dead_letter')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL,
    last_error      TEXT,
    created_at      REAL    NOT NULL,
    delivered_at    REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_final_call ON outbox (final_call_id);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_call ON outbox (call_id);
"""

_COLUMNS = (
    "id, event_id, kind, call_id, final_call_id, workspace_id, body, url, secret, policy,"
    " state, attempts, next_attempt_at, last_error, created_at, delivered_at"
)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    event_id: str
    kind: str
    call_id: str | None
    final: bool
    workspace_id: str
    body: bytes
    url: str
    secret: str = field(repr=False)  # keeps the secret out of logs and tracebacks
    policy: Policy
    state: State
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    delivered_at: float | None


def _row(r: tuple[Any, ...]) -> OutboxRow:
    return OutboxRow(
        id=r[0],
        event_id=r[1],
        kind=r[2],
        call_id=r[3],
        final=r[4] is not None,
        workspace_id=r[5],
        body=bytes(r[6]),
        url=r[7],
        secret=r[8],
        policy=cast(Policy, r[9]),
        state=cast(State, r[10]),
        attempts=r[11],
        next_attempt_at=r[12],
        last_error=r[13],
        created_at=r[14],
        delivered_at=r[15],
    )


def _check_url(url: str) -> None:
    u = URL(url)
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError("event destination must be an absolute http(s) URL")


class Outbox:
    """One connection to the outbox file; methods are quick synchronous calls.

    For tools, tests and threads. Code on an event loop uses `AsyncOutbox`, which runs these
    same methods on its process's writer thread, group-committed."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 5.0,
        _db: sqlite3.Connection | None = None,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = _db if _db is not None else self.connect(self.path, busy_timeout_s)
        self._closed = False

    @staticmethod
    def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
        """The file (created 0600: it holds signing secrets) open in WAL mode, synchronous=FULL
        (an acknowledged append survives power loss), schema applied."""
        return connect_wal(
            path, _SCHEMA, _SCHEMA_VERSION, busy_timeout_s=busy_timeout_s, what="outbox"
        )

    # -- appending ---------------------------------------------------------------------

    def append(
        self,
        event: Event,
        *,
        url: str,
        secret: str,
        policy: Policy,
        call_id: str | None,
        final: bool = False,
    ) -> bool:
        """Store `event` for delivery to `url`; committed (and fsynced) before returning.

        Returns False, writing nothing, when `final` and this call already has a final event
        (or when this event_id is already stored): callers racing to end a call, in any
        process, get exactly one True.
        """
        if policy not in POLICIES:
            raise ValueError(f"unknown delivery policy {policy!r}")
        if final and not call_id:
            raise ValueError("a final event needs a call_id")
        if not secret:
            raise ValueError("a signing secret is required")
        _check_url(url)
        now = time.time()
        # ON CONFLICT DO NOTHING (unlike INSERT OR IGNORE) only swallows UNIQUE conflicts;
        # a CHECK or NOT NULL violation still raises instead of silently dropping the event.
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO outbox (event_id, kind, call_id, final_call_id, workspace_id,"
                " body, url, secret, policy, state, attempts, next_attempt_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (
                    event.event_id,
                    event.kind,
                    call_id,
                    call_id if final else None,
                    event.workspace_id,
                    event.body,
                    url,
                    secret,
                    policy,
                    now,
                    now,
                ),
            )
            return cur.rowcount == 1

    # -- delivery bookkeeping ----------------------------------------------------------

    def due(self, now: float, limit: int) -> list[OutboxRow]:
        """Pending rows whose next attempt is at or before `now`, oldest due first."""
        return self._rows(
            "state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
            (now, limit),
        )

    def next_due_at(self, after: float | None = None) -> float | None:
        """The earliest next_attempt_at of a pending row (later than `after`, if given)."""
        with self._lock:
            r = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending'"
                " AND next_attempt_at > ?",
                (float("-inf") if after is None else after,),
            ).fetchone()
        return None if r is None or r[0] is None else float(r[0])

    def pending_after(self, row_id: int, limit: int) -> list[OutboxRow]:
        """Pending rows appended after row `row_id`, in id order (what is new since a look)."""
        return self._rows("id > ? AND state = 'pending' ORDER BY id LIMIT ?", (row_id, limit))

    def _rows(self, where: str, params: tuple[Any, ...] = ()) -> list[OutboxRow]:
        with self._lock:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE {where}", params)
            return [_row(r) for r in cur.fetchall()]

    def max_id(self) -> int:
        with self._lock:
            r = self._db.execute("SELECT MAX(id) FROM outbox").fetchone()
        return 0 if r is None or r[0] is None else int(r[0])

    def mark_delivered(self, row_id: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET state = 'delivered', attempts = attempts + 1,"
                " delivered_at = ? WHERE id = ?",
                (time.time(), row_id),
            )

    def mark_failed(self, row_id: int, error: str, next_attempt_at: float | None) -> None:
        """Count a failed attempt; `next_attempt_at=None` moves the row to dead_letter."""
        error = " ".join(error.split())[:_MAX_ERROR_CHARS]  # one line, bounded
        with self._lock:
            if next_attempt_at is None:
                self._db.execute(
                    "UPDATE outbox SET state = 'dead_letter', attempts = attempts + 1,"
                    " last_error = ? WHERE id = ? AND state = 'pending'",
                    (error, row_id),
                )
            else:
                self._db.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?,"
                    " next_attempt_at = ? WHERE id = ? AND state = 'pending'",
                    (error, next_attempt_at, row_id),
                )

    # -- inspection and operator actions -----------------------------------------------

    def get(self, row_id_or_event_id: int | str) -> OutboxRow | None:
        """A row by its integer id (or all-digit string) or by its event_id."""
        col, key = self._ident(row_id_or_event_id)
        with self._lock:
            r = self._db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE {col} = ?", (key,)
            ).fetchone()
        return None if r is None else _row(r)

    def dead_letters(self) -> list[OutboxRow]:
        return self._rows("state = 'dead_letter' ORDER BY id")

    def retry(self, row_id_or_event_id: int | str) -> bool:
        """dead_letter -> pending with attempts reset, due now. False if not a dead letter."""
        col, key = self._ident(row_id_or_event_id)
        with self._lock:
            cur = self._db.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?"
                f" WHERE {col} = ? AND state = 'dead_letter'",
                (time.time(), key),
            )
            return cur.rowcount == 1

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(STATES, 0)
        with self._lock:
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
                out[state] = n
        return out

    def has_final(self, call_id: str) -> bool:
        with self._lock:
            r = self._db.execute(
                "SELECT 1 FROM outbox WHERE final_call_id = ?", (call_id,)
            ).fetchone()
        return r is not None

    def rows_for_call(self, call_id: str) -> list[OutboxRow]:
        return self._rows("call_id = ? ORDER BY id", (call_id,))

    def open_calls(self) -> list[str]:
        """Calls with a `call.started` and no final event, oldest first (what a crash left
        open). `prune_delivered` never leaves a call's other rows without its final."""
        with self._lock:
            cur = self._db.execute(
                "SELECT call_id FROM outbox WHERE call_id IS NOT NULL GROUP BY call_id"
                " HAVING COUNT(final_call_id) = 0 AND SUM(kind = 'call.started') > 0"
                " ORDER BY MIN(id)"
            )
            return [str(r[0]) for r in cur.fetchall()]

    def prune_delivered(self, older_than: float, limit: int | None = None) -> int:
        """Delete rows delivered before `older_than` (unix time); returns how many.

        A pruned call no longer blocks a second final event, so keep well beyond any
        plausible late duplicate (days, not minutes). A final event goes only with (or after)
        every other row of its call: a call's dead letter left without its final would look
        like a call a crash left open (`open_calls`).
        `limit`: at most that many (the oldest), so one transaction holds the write lock
        briefly; call again until it returns less.
        """
        where = (
            "state = 'delivered' AND delivered_at < ?1"
            " AND (final_call_id IS NULL OR NOT EXISTS (SELECT 1 FROM outbox AS o"
            " WHERE o.call_id = outbox.final_call_id AND o.id != outbox.id"
            " AND NOT (o.state = 'delivered' AND o.delivered_at < ?1)))"
        )
        if limit is not None:
            where = f"id IN (SELECT id FROM outbox WHERE {where} ORDER BY id LIMIT ?2)"
        with self._lock:
            cur = self._db.execute(
                f"DELETE FROM outbox WHERE {where}",
                (older_than,) if limit is None else (older_than, limit),
            )
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _ident(ident: int | str) -> tuple[str, int | str]:
        if isinstance(ident, int):
            return "id", ident
        ident = ident.strip()
        return ("id", int(ident)) if ident.isdigit() else ("event_id", ident)


class AsyncOutbox:
    """The outbox for code on an event loop: each method queues its `Outbox` call on this
    process's one writer thread (gateway/events/committer.py) and returns an asyncio future,
    resolved once the batch it went in is committed and fsynced. Calls run in the order they
    were made (one FIFO), so a call's events are stored in the order they were emitted."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._store: Outbox | None = None
        self.committer = Committer(
            f"outbox {self.path}", self._connect,
            turns=self.path.with_name(self.path.name + "-turns"),
        )

    def _connect(self) -> sqlite3.Connection:
        db = Outbox.connect(self.path, self._busy_timeout_s)
        self._store = Outbox(self.path, _db=db)
        return db

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **kw: Any) -> AsyncOutbox:
        """Construct and wait until the file is open (raises what opening raised)."""
        outbox = cls(path, **kw)
        await asyncio.wrap_future(outbox.committer.opened)
        return outbox

    def run(
        self, fn: Callable[[Outbox], T], what: str = "", *, read: bool = False
    ) -> asyncio.Future[T]:
        """`fn(outbox)` on the writer thread, inside its batch's transaction (`read`: it only
        reads)."""
        return self.committer.submit(lambda _db: fn(cast(Outbox, self._store)), what, read=read)

    def append(
        self,
        event: Event,
        *,
        url: str,
        secret: str,
        policy: Policy,
        call_id: str | None,
        final: bool = False,
    ) -> asyncio.Future[bool]:
        """`Outbox.append`, group-committed: True once stored (and fsynced), False when the
        call already had its final event (or the event_id was stored)."""
        return self.run(
            lambda ob: ob.append(
                event, url=url, secret=secret, policy=policy, call_id=call_id, final=final
            ),
            f"append {event.kind} {event.event_id}",
        )

    def due(self, now: float, limit: int) -> asyncio.Future[list[OutboxRow]]:
        return self.run(lambda ob: ob.due(now, limit), "due", read=True)

    def pending_after(self, row_id: int, limit: int) -> asyncio.Future[list[OutboxRow]]:
        return self.run(lambda ob: ob.pending_after(row_id, limit), "pending_after", read=True)

    def max_id(self) -> asyncio.Future[int]:
        return self.run(lambda ob: ob.max_id(), "max_id", read=True)

    def next_due_at(self, after: float | None = None) -> asyncio.Future[float | None]:
        return self.run(lambda ob: ob.next_due_at(after), "next_due_at", read=True)

    def mark_delivered(self, row_id: int) -> asyncio.Future[None]:
        return self.run(lambda ob: ob.mark_delivered(row_id), f"mark_delivered {row_id}")

    def mark_failed(
        self, row_id: int, error: str, next_attempt_at: float | None
    ) -> asyncio.Future[None]:
        return self.run(
            lambda ob: ob.mark_failed(row_id, error, next_attempt_at), f"mark_failed {row_id}"
        )

    def counts(self) -> asyncio.Future[dict[str, int]]:
        return self.run(lambda ob: ob.counts(), "counts", read=True)

    def rows_for_call(self, call_id: str) -> asyncio.Future[list[OutboxRow]]:
        return self.run(lambda ob: ob.rows_for_call(call_id), "rows_for_call", read=True)

    async def prune_delivered(self, older_than: float, *, chunk: int = PRUNE_CHUNK) -> int:
        """`Outbox.prune_delivered` in transactions of at most `chunk` rows each (a week of
        rows in one DELETE would hold every writer back); returns how many in all."""
        total = 0
        while True:
            n = await self.run(
                lambda ob: ob.prune_delivered(older_than, chunk), "prune_delivered"
            )
            total += n
            if n < chunk:
                return total

    def close(self) -> concurrent.futures.Future[None]:
        """Commit what is queued, then close (idempotent); the future is done once closed."""
        return self.committer.close()

    async def aclose(self) -> None:
        await self.committer.aclose()
