import multiprocessing as mp
import os
import sqlite3
import stat
import time

import pytest

from gateway.events.envelope import make_event
from gateway.events.outbox import Outbox

URL = "http://127.0.0.1:9/events"


@pytest.fixture
def outbox(tmp_path):
    ob = Outbox(tmp_path / "outbox.sqlite3")
    yield ob
    ob.close()


def _append(ob, kind="call.started", *, call_id="call-1", final=False, policy="control_plane"):
    ev = make_event(kind, "ws-1", {"call_id": call_id})
    return ev, ob.append(ev, url=URL, secret="s3cret", policy=policy, call_id=call_id, final=final)


def test_file_is_private_and_wal(tmp_path):
    old = os.umask(0o022)
    try:
        ob = Outbox(tmp_path / "sub" / "outbox.sqlite3")
    finally:
        os.umask(old)
    _append(ob)
    for name in ("outbox.sqlite3", "outbox.sqlite3-wal"):
        mode = stat.S_IMODE((tmp_path / "sub" / name).stat().st_mode)
        assert mode & 0o077 == 0, (name, oct(mode))
    db = sqlite3.connect(tmp_path / "sub" / "outbox.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    ob.close()


def test_existing_loose_file_is_tightened(tmp_path):
    p = tmp_path / "outbox.sqlite3"
    p.touch(mode=0o644)
    os.chmod(p, 0o644)
    Outbox(p).close()
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_append_is_durable_and_visible_to_other_connections(tmp_path, outbox):
    ev, ok = _append(outbox)
    assert ok
    with Outbox(tmp_path / "outbox.sqlite3") as other:
        (row,) = other.due(time.time(), 10)
    assert row.event_id == ev.event_id and row.body == ev.body
    assert row.state == "pending" and row.attempts == 0 and row.secret == "s3cret"
    assert row.policy == "control_plane" and row.call_id == "call-1" and not row.final
    assert "s3cret" not in repr(row)


def test_exactly_one_final_event_per_call(outbox):
    _, ok1 = _append(outbox, "call.completed", final=True)
    _, ok2 = _append(outbox, "call.failed", final=True)
    _, ok3 = _append(outbox, "call.recording.ready")  # non-final events still go in
    _, ok4 = _append(outbox, "call.completed", call_id="call-2", final=True)
    assert (ok1, ok2, ok3, ok4) == (True, False, True, True)
    assert outbox.has_final("call-1") and outbox.has_final("call-2")
    assert not outbox.has_final("call-3")
    kinds = [(r.kind, r.final) for r in outbox.rows_for_call("call-1")]
    assert kinds == [("call.completed", True), ("call.recording.ready", False)]


def test_duplicate_event_id_is_ignored(outbox):
    ev, ok = _append(outbox)
    again = outbox.append(ev, url=URL, secret="x", policy="customer", call_id=None)
    assert ok and not again
    assert outbox.counts()["pending"] == 1


def test_append_validates(outbox):
    ev = make_event("k", "ws", {})
    with pytest.raises(ValueError):
        outbox.append(ev, url=URL, secret="s", policy="nope", call_id=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        outbox.append(ev, url=URL, secret="s", policy="customer", call_id=None, final=True)
    with pytest.raises(ValueError):
        outbox.append(ev, url="ftp://x/y", secret="s", policy="customer", call_id=None)
    with pytest.raises(ValueError):
        outbox.append(ev, url="/relative", secret="s", policy="customer", call_id=None)
    assert outbox.counts() == {"pending": 0, "delivered": 0, "dead_letter": 0}


def test_due_ordering_and_state_transitions(outbox):
    _append(outbox, call_id="a")
    _append(outbox, call_id="b")
    now = time.time()
    a, b = outbox.due(now, 10)
    assert [a.call_id, b.call_id] == ["a", "b"]
    assert len(outbox.due(now, 1)) == 1

    outbox.mark_failed(a.id, "HTTP 503:\n  busy", now + 100)
    (b2,) = outbox.due(now + 1, 10)
    assert b2.id == b.id
    a2 = outbox.get(a.id)
    assert a2 is not None
    assert (a2.state, a2.attempts, a2.last_error) == ("pending", 1, "HTTP 503: busy")
    assert outbox.next_due_at() == pytest.approx(b.next_attempt_at)
    assert outbox.next_due_at(after=now + 1) == pytest.approx(now + 100)
    assert outbox.next_due_at(after=now + 100) is None

    outbox.mark_delivered(b.id)
    b3 = outbox.get(b.event_id)
    assert b3 is not None and b3.state == "delivered" and b3.attempts == 1
    assert b3.delivered_at is not None
    assert outbox.next_due_at() == pytest.approx(now + 100)

    outbox.mark_failed(a.id, "HTTP 400", None)
    assert outbox.due(now + 1000, 10) == []
    (dead,) = outbox.dead_letters()
    assert dead.id == a.id and dead.attempts == 2 and dead.last_error == "HTTP 400"
    assert outbox.counts() == {"pending": 0, "delivered": 1, "dead_letter": 1}
    # a late mark on a dead letter changes nothing
    outbox.mark_failed(a.id, "late", now)
    assert outbox.get(a.id).state == "dead_letter"  # type: ignore[union-attr]


def test_retry_dead_letter_by_row_id_or_event_id(outbox):
    ev1, _ = _append(outbox, call_id="a")
    ev2, _ = _append(outbox, call_id="b")
    r1, r2 = outbox.due(time.time(), 10)
    assert not outbox.retry(r1.id)  # pending is not retryable
    for r in (r1, r2):
        outbox.mark_failed(r.id, "gone", None)
    assert outbox.retry(r1.id)
    assert outbox.retry(ev2.event_id)
    assert not outbox.retry(ev2.event_id)  # already pending again
    assert not outbox.retry("no-such-event") and not outbox.retry(999)
    rows = outbox.due(time.time(), 10)
    assert {r.event_id for r in rows} == {ev1.event_id, ev2.event_id}
    assert all(r.attempts == 0 and r.state == "pending" for r in rows)
    assert outbox.retry(str(r1.id)) is False  # digit strings mean row ids


def test_prune_delivered(outbox):
    _append(outbox, call_id="a")
    (r,) = outbox.due(time.time(), 1)
    outbox.mark_delivered(r.id)
    assert outbox.prune_delivered(time.time() - 60) == 0
    assert outbox.prune_delivered(time.time() + 1) == 1
    assert outbox.counts()["delivered"] == 0


def _racer(path: str, barrier, calls: int, results) -> None:
    ob = Outbox(path)
    wins = 0
    barrier.wait()
    for i in range(calls):
        ev = make_event("call.completed", "ws", {"call_id": f"call-{i}", "pid": os.getpid()})
        if ob.append(
            ev, url=URL, secret="s", policy="control_plane", call_id=f"call-{i}", final=True
        ):
            wins += 1
        ev = make_event("call.recording.ready", "ws", {"call_id": f"call-{i}"})
        ob.append(ev, url=URL, secret="s", policy="customer", call_id=f"call-{i}")
    ob.close()
    results.put(wins)


def test_final_event_unique_across_racing_processes(tmp_path):
    path = str(tmp_path / "outbox.sqlite3")
    procs_n, calls = 6, 60
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs_n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(path, barrier, calls, results)) for _ in range(procs_n)
    ]
    for p in procs:
        p.start()
    wins = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert sum(wins) == calls
    with Outbox(path) as ob:
        assert ob.counts()["pending"] == calls + calls * procs_n
        for i in range(calls):
            finals = [r for r in ob.rows_for_call(f"call-{i}") if r.final]
            assert len(finals) == 1
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
