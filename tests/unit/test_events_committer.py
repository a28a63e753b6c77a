"""The outbox's writer thread: group commit, results only after COMMIT, errors that fail alone."""

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gateway.events.committer import Committer, connect_wal
from gateway.events.envelope import make_event
from gateway.events.outbox import AsyncOutbox, Outbox

URL = "https://cp.example/events"
SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"


def _committer(path: Path) -> Committer:
    return Committer("test", lambda: connect_wal(path, SCHEMA, 1, busy_timeout_s=0.1, what="t"))


def _insert(k: str, v: int | None = 1):
    return lambda db: db.execute("INSERT INTO t VALUES (?, ?)", (k, v)).rowcount


def _stall(c: Committer) -> threading.Event:
    """Hold the thread inside a job, so what is queued next waits for one batch."""
    gate = threading.Event()
    c.note(lambda db: gate.wait(5), "stall")
    return gate


async def test_many_queued_appends_go_in_one_commit(tmp_path: Path) -> None:
    ob = await AsyncOutbox.open(tmp_path / "outbox.sqlite3")
    gate = _stall(ob.committer)
    events = [make_event("call.started", "ws", {"call_id": f"c{i}"}) for i in range(200)]
    futs = [
        ob.append(e, url=URL, secret="s", policy="customer", call_id=f"c{i}")
        for i, e in enumerate(events)
    ]
    await asyncio.sleep(0.05)
    assert not any(f.done() for f in futs)  # nothing is acknowledged before its commit
    before = ob.committer.commits
    gate.set()
    assert await asyncio.gather(*futs) == [True] * 200
    assert ob.committer.commits - before <= 2  # the stalled batch, then all 200 together
    await ob.aclose()
    with Outbox(tmp_path / "outbox.sqlite3") as sync:
        assert sync.counts()["pending"] == 200


async def test_a_result_is_handed_back_only_after_commit(tmp_path: Path) -> None:
    """A second connection sees the row by the time the future resolves, never earlier."""
    path = tmp_path / "t.sqlite3"
    c = _committer(path)
    await asyncio.wrap_future(c.opened)
    gate = threading.Event()
    seen_inside: list[int] = []
    other = sqlite3.connect(path, check_same_thread=False)

    def job(db: sqlite3.Connection) -> int:
        db.execute("INSERT INTO t VALUES ('a', 1)")
        seen_inside.append(other.execute("SELECT COUNT(*) FROM t").fetchone()[0])
        gate.wait(5)
        return 7

    fut = c.submit(job)
    await asyncio.sleep(0.05)
    assert not fut.done()
    gate.set()
    assert await fut == 7
    assert seen_inside == [0]  # uncommitted while the job ran
    assert other.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    other.close()
    await c.aclose()


async def test_an_error_fails_only_that_items_future(tmp_path: Path) -> None:
    c = _committer(tmp_path / "t.sqlite3")
    gate = _stall(c)
    ok1 = c.submit(_insert("a"))
    bad = c.submit(_insert("b", None))  # NOT NULL: rolled back to its savepoint alone
    dup = c.submit(_insert("a"))  # PRIMARY KEY
    ok2 = c.submit(_insert("c"))
    gate.set()
    assert await ok1 == 1 and await ok2 == 1
    with pytest.raises(sqlite3.IntegrityError):
        await bad
    with pytest.raises(sqlite3.IntegrityError):
        await dup
    rows = await c.submit(lambda db: db.execute("SELECT k FROM t ORDER BY k").fetchall())
    assert rows == [("a",), ("c",)]
    await c.aclose()


async def test_close_flushes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    ob = AsyncOutbox(path)
    gate = _stall(ob.committer)
    futs = [
        ob.append(make_event("call.started", "ws", {}), url=URL, secret="s", policy="customer",
                  call_id=f"c{i}")
        for i in range(50)
    ]
    closed = ob.close()
    with pytest.raises(RuntimeError):
        await ob.counts()  # closed to new work...
    gate.set()
    await asyncio.wrap_future(closed)
    assert all(f.done() and f.result() for f in futs)  # ...but what was queued is on disk
    with Outbox(path) as sync:
        assert sync.counts()["pending"] == 50


async def test_one_final_per_call_across_processes_connections(tmp_path: Path) -> None:
    """Racing finals from two writer threads (two processes' worth): exactly one is stored."""
    path = tmp_path / "outbox.sqlite3"
    a, b = AsyncOutbox(path), AsyncOutbox(path)
    futs = [
        ob.append(make_event("call.completed", "ws", {"n": i}), url=URL, secret="s",
                  policy="control_plane", call_id="c1", final=True)
        for i in range(10) for ob in (a, b)
    ]
    assert sorted(await asyncio.gather(*futs)) == [False] * 19 + [True]
    await a.aclose()
    await b.aclose()


async def test_another_process_holding_the_lock_waits_on_the_thread_not_the_loop(
    tmp_path: Path,
) -> None:
    """Past busy_timeout (0.1 s here) the thread tries again; the loop keeps running."""
    path = tmp_path / "t.sqlite3"
    c = _committer(path)
    await asyncio.wrap_future(c.opened)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    fut = c.submit(_insert("a"))
    ticks = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        await asyncio.sleep(0.01)
        ticks += 1
    assert not fut.done() and ticks > 5  # a blocked loop: 1
    other.execute("COMMIT")
    assert await asyncio.wait_for(fut, 5) == 1
    other.close()
    await c.aclose()


async def test_open_failure_fails_callers(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    ob = AsyncOutbox(tmp_path / "file" / "outbox.sqlite3")
    with pytest.raises(OSError):
        await asyncio.wrap_future(ob.committer.opened)
    with pytest.raises(OSError):
        await ob.counts()


async def test_processes_opening_a_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    """Switching a new file to WAL does not wait for the busy timeout: opening tries again."""
    for i in range(50):
        obs = [AsyncOutbox(tmp_path / f"o{i}.sqlite3") for _ in range(2)]
        for ob in obs:
            await asyncio.wrap_future(ob.committer.opened)
        for ob in obs:
            await ob.aclose()


async def test_a_full_disk_fails_that_write_and_the_writer_keeps_going(tmp_path: Path) -> None:
    """SQLITE_FULL rolls the transaction back itself: the thread must not die on ROLLBACK."""
    ob = await AsyncOutbox.open(tmp_path / "outbox.sqlite3")
    fix = ob.committer.submit(
        lambda db: db.execute(
            "PRAGMA max_page_count = "
            + str(db.execute("PRAGMA page_count").fetchone()[0] + 2)
        ).fetchone()
    )
    await asyncio.wait_for(fix, 5)
    big = make_event("call.started", "ws", {"call_id": "big", "pad": "x" * 200_000})
    with pytest.raises(sqlite3.Error):
        await asyncio.wait_for(
            ob.append(big, url=URL, secret="s", policy="customer", call_id="big"), 5
        )
    small = make_event("call.started", "ws", {"call_id": "small"})
    assert await asyncio.wait_for(
        ob.append(small, url=URL, secret="s", policy="customer", call_id="small"), 5
    )
    assert (await asyncio.wait_for(ob.counts(), 5))["pending"] == 1
    assert not ob.committer.dead
    await ob.aclose()


async def test_reads_run_outside_the_write_transaction(tmp_path: Path) -> None:
    """A read queued with a write does not hold the write lock (nor the turn) while it reads:
    another process can write meanwhile."""
    path = tmp_path / "outbox.sqlite3"
    ob = await AsyncOutbox.open(path)
    other = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    could_write: list[bool] = []

    def read(_ob: Outbox) -> None:
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            could_write.append(True)
        except sqlite3.OperationalError:
            could_write.append(False)

    gate = _stall(ob.committer)
    ev = make_event("call.started", "ws", {"call_id": "c"})
    w = ob.append(ev, url=URL, secret="s", policy="customer", call_id="c")
    r = ob.run(read, "read", read=True)
    gate.set()
    assert await asyncio.wait_for(w, 5)
    await asyncio.wait_for(r, 5)
    assert could_write == [True]
    other.close()
    await ob.aclose()


async def test_a_stopped_turn_holder_does_not_stall_writes_forever(tmp_path: Path) -> None:
    """Another process holding the turns file (SIGSTOPped, say): after a bounded wait the
    write goes ahead on SQLite's own locking."""
    import fcntl
    import os

    path = tmp_path / "outbox.sqlite3"
    ob = await AsyncOutbox.open(path)
    ob.committer._turn_wait_s = 0.3
    fd = os.open(path.with_name(path.name + "-turns"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        ev = make_event("call.started", "ws", {"call_id": "c"})
        fut = ob.append(ev, url=URL, secret="s", policy="customer", call_id="c")
        assert await asyncio.wait_for(fut, 3)
        ev2 = make_event("call.started", "ws", {"call_id": "d"})
        fut = ob.append(ev2, url=URL, secret="s", policy="customer", call_id="d")
        assert await asyncio.wait_for(fut, 3)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    ev3 = make_event("call.started", "ws", {"call_id": "e"})
    fut = ob.append(ev3, url=URL, secret="s", policy="customer", call_id="e")
    assert await asyncio.wait_for(fut, 3)
    await asyncio.wait_for(ob.aclose(), 5)


async def test_prune_deletes_in_bounded_transactions(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as sync:
        for i in range(7):
            ev = make_event("call.started", "ws", {"call_id": f"c{i}"})
            sync.append(ev, url=URL, secret="s", policy="customer", call_id=f"c{i}")
            sync.mark_delivered(i + 1)
        assert sync.prune_delivered(time.time() + 1, limit=3) == 3
    ob = await AsyncOutbox.open(path)
    before = ob.committer.commits
    assert await asyncio.wait_for(ob.prune_delivered(time.time() + 1, chunk=2), 5) == 4
    assert ob.committer.commits - before >= 2
    await ob.aclose()


async def test_a_note_racing_close_is_run_or_reported_never_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A note() from another thread that passed the closed check just as close() queued the
    stop: it must run (or be logged as dropped), not vanish."""
    from gateway.events import committer as committer_mod

    c = _committer(tmp_path / "t.sqlite3")
    await asyncio.wrap_future(c.opened)
    real = c._queue

    class SlowPut:  # the noting thread is preempted between its check and its put
        def put(self, item: object) -> None:
            if item is not committer_mod._STOP:
                time.sleep(0.2)
            real.put(item)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    c._queue = SlowPut()  # type: ignore[assignment]
    ran = threading.Event()
    noter = threading.Thread(target=lambda: c.note(lambda db: ran.set(), "late note"))
    noter.start()
    await asyncio.sleep(0.05)  # the noter is inside note(), past the check
    await asyncio.wait_for(asyncio.wrap_future(c.close()), 5)
    noter.join(5)
    await asyncio.sleep(0.05)
    assert ran.is_set() or "late note" in caplog.text
