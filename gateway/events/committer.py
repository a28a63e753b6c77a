"""One SQLite writer thread per store and process, group-committing what callers queue.

The thread owns the store's one connection. It takes every job waiting at that moment (up to
`max_batch`) and runs them in ONE transaction, so a burst of writes from many calls costs one
fsync (`synchronous=FULL` stays: a result is handed back only once the COMMIT, and its fsync,
is done). A job that raises fails alone: the batch is rolled back and run again with each job
in its own savepoint (so a job may run twice; only its committed run counts). A batch's writes
go first, then its reads, in their own deferred transaction that holds no write lock (nor the
turn): a read sees every write queued before it. Whatever goes wrong with a batch fails that
batch's futures and the thread goes on; if the thread itself ends, what is queued fails
(`dead`) and nothing more is taken.

Nothing here blocks an event loop: `submit` (on a loop) returns an asyncio future that the
thread resolves with `loop.call_soon_threadsafe`, once per loop per batch. When another
process holds the write lock past `busy_timeout`, the thread waits and tries the batch again
(up to `lock_wait_s`); the loop never does. A process that keeps the turn (stopped, say) holds
the others back `turn_wait_s` at most: then they write on SQLite's own locking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]

MAX_BATCH = 500  # jobs per transaction: bounds how long one commit holds results back
LOCK_WAIT_S = 60.0  # a billing event is worth waiting for another process's write lock
# how long a batch waits for its turn before it goes ahead on SQLite's own busy handler: a
# process stopped while holding the turn (SIGSTOP, a debugger) must not stall every writer
TURN_WAIT_S = 2.0


def create_private(path: Path) -> None:
    """Create the file 0600 before SQLite opens it (stores hold secrets and customer data);
    SQLite gives its -wal/-shm files the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except PermissionError:
        pass  # someone else's file; leave it as its owner set it
    finally:
        os.close(fd)


def connect_wal(
    path: Path, schema: str, version: int, *, busy_timeout_s: float, what: str
) -> sqlite3.Connection:
    """Open `path` (created 0600) in WAL mode with synchronous=FULL and its schema applied.
    isolation_level=None: the caller decides where transactions begin and end. Processes
    opening a new file at once can find it locked (switching it to WAL does not wait for the
    busy timeout): tried again until `busy_timeout_s` is up. Never call it on an event loop."""
    create_private(path)
    deadline = time.monotonic() + busy_timeout_s
    while True:
        db = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            _prepare(db, path, schema, version, what, busy_timeout_s)
            return db
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            if not _busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _prepare(
    db: sqlite3.Connection, path: Path, schema: str, version: int, what: str, busy_s: float
) -> None:
    db.execute(f"PRAGMA busy_timeout = {int(busy_s * 1000)}")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise RuntimeError(f"{what} {path} cannot use WAL mode (got {mode})")
    # FULL syncs the WAL on every commit: an acknowledged write survives power loss
    db.execute("PRAGMA synchronous = FULL")
    if db.execute("PRAGMA user_version").fetchone()[0] == version:
        return  # in place: no write lock to wait for while other processes write
    db.execute("BEGIN IMMEDIATE")
    for stmt in schema.split(";"):
        if stmt.strip():
            db.execute(stmt)
    db.execute(f"PRAGMA user_version = {version}")
    db.execute("COMMIT")


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


@dataclass(slots=True)
class _Item:
    fn: Job
    what: str  # for the log line when a fire-and-forget write fails
    # one of: an asyncio future and its loop, a concurrent future, or neither (fire-and-forget)
    future: asyncio.Future[Any] | concurrent.futures.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    read: bool = False  # only reads: run in their own transaction, which takes no write lock


class _Turn:
    """One flock request in the kernel's queue, made by a helper thread so that the writer
    can stop waiting for it (`flock` has no timeout). The writer goes on waiting on the same
    request at its next batch (its place in the queue is kept); a request granted once
    nobody waits for it is handed back at once."""

    def __init__(self, fd: int) -> None:
        # its own descriptor of the same open file (so the same flock): valid even if the
        # writer closes its own before this request is granted
        self.fd = os.dup(fd)
        self.lock = threading.Lock()
        self.granted = threading.Event()
        self.wanted = True
        self.finished = False  # granted and handed back unused: make a new request
        threading.Thread(target=self._wait, name="committer-turn", daemon=True).start()

    def _wait(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # sleeps in the kernel's queue, GIL released
            with self.lock:
                if self.wanted:
                    self.granted.set()
                    return
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                self.finished = True
        finally:
            os.close(self.fd)  # the writer's descriptor still holds a granted lock


_STOP = object()


class _JobFailed(Exception):
    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """On the loop: hand each result to its future (unless its waiter gave up)."""
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class Committer:
    """The writer thread of one store; see the module docstring.

    `connect` runs on the thread and returns the open connection; `idle` (seconds, job) runs
    the job at the first moment the queue is empty once that long has passed since the last
    run (retention pruning). `turns`: a file every process writing this database flocks
    around its write transactions, so that they take turns in the kernel's queue instead of
    polling SQLite's busy handler (which sleeps up to 100 ms between tries: with dozens of
    writers, some starve for seconds); SQLite's own locking still decides, so a writer that
    does not take turns (a tool) is merely not queued."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        *,
        max_batch: int = MAX_BATCH,
        lock_wait_s: float = LOCK_WAIT_S,
        idle: tuple[float, Job] | None = None,
        turns: Path | None = None,
        turn_wait_s: float = TURN_WAIT_S,
    ) -> None:
        self.name = name
        self._turns = turns
        self._turn_fd: int | None = None
        self._turn: _Turn | None = None
        self._turn_wait_s = turn_wait_s
        self._connect = connect
        self._max_batch = max_batch
        self._lock_wait_s = lock_wait_s
        self._idle = idle
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self.opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed = False
        # check-and-put is atomic: nothing is queued behind _STOP, nor after the thread ended
        # (re-entrant: a `done` callback may submit, and is refused)
        self._gate = threading.RLock()
        self.died: BaseException | None = None  # why the thread ended before `close`
        self.commits = 0  # transactions committed (for benchmarks and tests)
        self.jobs = 0  # jobs run in them
        self._thread = threading.Thread(target=self._run, name=f"committer:{name}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dead(self) -> bool:
        """The thread ended without being closed: nothing queued will ever be written."""
        return self.died is not None

    # -- callers ---------------------------------------------------------------------------

    def submit(
        self, fn: Callable[[sqlite3.Connection], T], what: str = "", *, read: bool = False
    ) -> asyncio.Future[T]:
        """Queue `fn` (run on the thread); its result once committed. Call on a running loop.
        `read`: `fn` only reads (it may then share a transaction that takes no write lock)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        err = self._put(_Item(fn, what, fut, loop, read))
        if err is not None:
            fut.set_exception(err)
        return fut

    def submit_threadsafe(
        self, fn: Callable[[sqlite3.Connection], T], what: str = ""
    ) -> concurrent.futures.Future[T]:
        """`submit` for any thread, loop or not (`.result()` blocks: never on a loop)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        err = self._put(_Item(fn, what, fut))
        if err is not None:
            fut.set_exception(err)
        return fut

    def note(self, fn: Job, what: str) -> None:
        """Fire-and-forget from any thread; a failure is logged."""
        err = self._put(_Item(fn, what))
        if err is not None:
            log.warning("%s; dropped %s", err, what)

    def close(self) -> concurrent.futures.Future[None]:
        """Commit what is queued, then close the connection. Idempotent; `done` when closed."""
        with self._gate:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        return self.done

    def _put(self, item: _Item) -> BaseException | None:
        """Queue `item`, or why not (closed, or the thread is gone)."""
        with self._gate:
            err = self._refused()
            if err is None:
                self._queue.put(item)
            return err

    async def aclose(self) -> None:
        await asyncio.wrap_future(self.close())

    def _refused(self) -> BaseException | None:
        if self.died is not None:
            return RuntimeError(f"{self.name}: writer thread died ({self.died!r})")
        if self._closed:
            return RuntimeError(f"{self.name} is closed")
        if self.done.done():  # the thread is gone (it could not open the file)
            exc = self.opened.exception() if self.opened.done() else None
            return exc or RuntimeError(f"{self.name} is closed")
        return None

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._turns is not None:
                create_private(self._turns)
                self._turn_fd = os.open(self._turns, os.O_RDWR)
            db = self._connect()
        except BaseException as exc:
            log.error("%s cannot be opened: %s", self.name, exc)
            self.opened.set_exception(exc)
            with self._gate:
                self.done.set_result(None)
            self._fail_all(exc)
            return
        self.opened.set_result(None)
        try:
            self._loop(db)
        except BaseException as exc:  # a bug here: make it loud, and fail every waiter
            self.died = exc
            log.error("%s: writer thread died; queued writes fail", self.name, exc_info=exc)
        finally:
            db.close()
            if self._turn is not None:
                with self._turn.lock:
                    self._turn.wanted = False
            if self._turn_fd is not None:
                os.close(self._turn_fd)
            with self._gate:  # from here every put is refused: what is queued is all there is
                self.done.set_result(None)
            self._fail_all(self.died or RuntimeError(f"{self.name} is closed"))

    def _loop(self, db: sqlite3.Connection) -> None:
        every = self._idle[0] if self._idle else None
        next_idle = None if every is None else time.monotonic() + every
        while True:
            try:
                wait = None if next_idle is None else max(0.0, next_idle - time.monotonic())
                first = self._queue.get(timeout=wait)
            except queue.Empty:
                assert self._idle is not None and every is not None
                next_idle = time.monotonic() + every
                self._batch(db, [_Item(self._idle[1], "idle job")])
                continue
            batch: list[_Item] = []
            stop = first is _STOP
            turn = False
            if not stop:
                batch.append(cast(_Item, first))
                if not cast(_Item, first).read:
                    # waiting for our turn lets more work queue: it joins this batch
                    turn = self._take_turn()
            while not stop and len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                else:
                    batch.append(cast(_Item, item))
            # writes in their turn and one transaction; then reads in their own, deferred one,
            # outside the turn (a long scan never holds every process's writers back); a read
            # still sees every write queued before it
            writes = [item for item in batch if not item.read]
            reads = [item for item in batch if item.read]
            if writes:
                if not turn:
                    turn = self._take_turn()
                try:
                    self._batch(db, writes)
                finally:
                    if turn:
                        self._end_turn()
            elif turn:
                self._end_turn()
            if reads:
                self._batch(db, reads)
            if stop:
                break

    def _take_turn(self) -> bool:
        """Wait (up to `turn_wait_s`) for this process's turn; False: go without it."""
        if self._turn_fd is None:
            return False
        turn = self._turn
        if turn is not None:
            with turn.lock:
                if turn.finished:
                    turn = None
                else:
                    turn.wanted = True
        if turn is None:
            turn = self._turn = _Turn(self._turn_fd)
        if turn.granted.wait(self._turn_wait_s):
            self._turn = None
            return True
        with turn.lock:
            if turn.granted.is_set():  # just now
                self._turn = None
                return True
            turn.wanted = False  # still queued: granted later, it is handed back at once
        log.warning("%s: no turn after %.1fs (a process holding it is stuck?); writing on"
                    " SQLite's locking alone", self.name, self._turn_wait_s)
        return False

    def _end_turn(self) -> None:
        assert self._turn_fd is not None
        fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def _batch(self, db: sqlite3.Connection, items: list[_Item]) -> None:
        """Run `items`; whatever goes wrong fails this batch's futures, never the thread."""
        try:
            self._attempt(db, items)
        except Exception as exc:
            log.error("%s: a batch of %d job(s) failed: %r", self.name, len(items), exc)
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error as again:
                log.error("%s: rollback failed: %s", self.name, again)
            self._hand_back([(item, False, exc) for item in items])

    def _attempt(self, db: sqlite3.Connection, items: list[_Item]) -> None:
        deadline = time.monotonic() + self._lock_wait_s
        isolate = False
        while True:
            try:
                results = self._transaction(db, items, isolate=isolate)
                break
            except _JobFailed as failed:  # only on the fast path: again, each job on its own
                # SQLITE_FULL, IOERR, NOMEM... have rolled the transaction back already
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if len(items) == 1:
                    results = [(items[0], False, failed.exc)]
                    break
                isolate = True
            except Exception as exc:  # the transaction itself failed
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if _busy(exc) and time.monotonic() < deadline:
                    # another process held the write lock past busy_timeout: this thread
                    # waits (again), no loop does
                    log.warning("%s busy (%s); trying %d write(s) again", self.name, exc,
                                len(items))
                    continue
                log.error("%s: a batch of %d job(s) failed: %s", self.name, len(items), exc)
                results = [(item, False, exc) for item in items]
                break
        self._hand_back(results)

    def _transaction(
        self, db: sqlite3.Connection, items: list[_Item], *, isolate: bool
    ) -> list[tuple[_Item, bool, Any]]:
        """All `items` in one transaction. The fast path runs them back to back and raises
        `_JobFailed` at the first that fails (the caller rolls back and comes again with
        `isolate`: each job in its own savepoint, so a bad job fails alone). Few statements
        while the write lock is held matter: each one gives up and takes back the GIL, and a
        loop thread holding it can make every other process wait. Raises when BEGIN or
        COMMIT fails: then none of them happened."""
        results: list[tuple[_Item, bool, Any]] = []
        reads_only = all(item.read for item in items)
        # a write takes the lock at BEGIN (no deadlock upgrading a read later); reads alone
        # take a snapshot and leave other processes' writers alone
        db.execute("BEGIN" if reads_only else "BEGIN IMMEDIATE")
        for item in items:
            if not isolate:
                try:
                    results.append((item, True, item.fn(db)))
                except Exception as exc:
                    raise _JobFailed(exc) from exc
                continue
            db.execute("SAVEPOINT job")
            try:
                value = item.fn(db)
            except Exception as exc:
                db.execute("ROLLBACK TO job")
                db.execute("RELEASE job")
                results.append((item, False, exc))
            else:
                db.execute("RELEASE job")
                results.append((item, True, value))
        db.execute("COMMIT")
        if not reads_only:
            self.commits += 1  # a write transaction: one fsync
        self.jobs += len(items)
        return results

    def _hand_back(self, results: list[tuple[_Item, bool, Any]]) -> None:
        """After the COMMIT: one call_soon_threadsafe per loop for the whole batch."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]]
        per_loop = {}
        for item, ok, value in results:
            fut = item.future
            if fut is None:
                if not ok:
                    log.error("%s: %s failed: %s", self.name, item.what, value)
            elif item.loop is not None:
                per_loop.setdefault(item.loop, []).append(
                    (cast(asyncio.Future[Any], fut), ok, value)
                )
            else:
                cf = cast(concurrent.futures.Future[Any], fut)
                if cf.done():  # cancelled by its waiter
                    continue
                if ok:
                    cf.set_result(value)
                else:
                    cf.set_exception(value)
        for loop, batch in per_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, batch)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _fail_all(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Item):
                if item.future is None:
                    log.error("%s: %s dropped: %s", self.name, item.what, exc)
                else:
                    self._hand_back([(item, False, exc)])
