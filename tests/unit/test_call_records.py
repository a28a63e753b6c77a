"""The call record store: round trips, list order/cursor/filters, merge rules, prune,
idempotency keys, restart survival, the file's mode, and that the loop is never blocked."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.calls.records import CallRecords, sort_key
from gateway.events.envelope import make_event

T0 = 1_790_000_000.0


def summary(call_id: str, started: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": call_id,
        "call_id": call_id,
        "workspace_id": "ws_1",
        "session_id": call_id,
        "parent_call_id": None,
        "direction": "outbound",
        "from": "+254700000001",
        "to": "+254722000001",
        "local_e164": "+254700000001",
        "remote_e164": "+254722000001",
        "number_id": "num_1",
        "client_request_id": None,
        "status": "ringing",
        "started_at": started,
        "answered_at": None,
        "ended_at": None,
        "duration_seconds": None,
        "worker": 0,
    }
    return base | kw


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path):
    records = await CallRecords.open(tmp_path / "calls.sqlite3", clock=Clock())
    yield records
    await records.close()


async def test_call_round_trip_and_merge(store: CallRecords) -> None:
    s = summary("c1", "2026-06-27T10:00:00.000Z")
    await store.upsert_call(s)
    assert await store.get("c1") == s
    assert await store.get("nope") is None
    # a later update: None never erases, new values win
    await store.upsert_call(
        {
            "call_id": "c1",
            "status": "completed",
            "ended_at": "2026-06-27T10:01:00.000Z",
            "answered_at": "2026-06-27T10:00:05.000Z",
            "duration_seconds": 55,
            "sip_code": 200,
        }
    )
    await store.upsert_call(summary("c1", "2026-06-27T10:00:00.000Z", status="in-progress"))
    got = await store.get("c1")
    assert got is not None
    # the final status is kept against a late live summary; its timestamps survive the Nones
    assert got["status"] == "completed"
    assert got["ended_at"] == "2026-06-27T10:01:00.000Z"
    assert got["duration_seconds"] == 55 and got["sip_code"] == 200


async def test_list_order_cursor_and_filters(store: CallRecords) -> None:
    for i in range(7):
        direction = "inbound" if i % 2 else "outbound"
        status = "completed" if i < 3 else "in-progress"
        await store.upsert_call(
            summary(f"c{i}", f"2026-06-27T10:00:0{i}.000Z", direction=direction, status=status)
        )
    # two calls in the same millisecond: call_id breaks the tie, the cursor skips neither
    await store.upsert_call(summary("c7b", "2026-06-27T10:00:06.000Z"))
    ids = [c["call_id"] for c in await store.list(limit=100)]
    assert ids == ["c7b", "c6", "c5", "c4", "c3", "c2", "c1", "c0"]
    pages: list[str] = []
    cursor = None
    while True:
        page = await store.list(limit=3, cursor=cursor)
        pages += [c["call_id"] for c in page]
        if len(page) < 3:
            break
        cursor = sort_key(page[-1])
    assert pages == ids
    done = await store.list(status=["completed"])
    assert [c["call_id"] for c in done] == ["c2", "c1", "c0"]
    inbound = await store.list(direction="inbound", status=["completed", "in-progress"])
    assert [c["call_id"] for c in inbound] == ["c5", "c3", "c1"]
    assert await store.list(status=[]) == []


async def test_events_and_recordings(store: CallRecords) -> None:
    store.note_event("c1", "ev1", "call.started", {"call_id": "c1"}, "2026-06-27T10:00:00.000Z")
    store.note_event("c1", "ev2", "call.answered", {"call_id": "c1"}, "2026-06-27T10:00:01.000Z")
    store.note_event("c1", "ev1", "call.started", {"dup": True}, "2026-06-27T10:00:09.000Z")
    store.note_event("c2", "ev3", "call.started", {}, "2026-06-27T10:00:02.000Z")
    await store.flush()
    evs = await store.events("c1")
    assert [e.id for e in evs] == ["ev1", "ev2"]
    assert evs[0].api() == {
        "id": "ev1",
        "call_id": "c1",
        "kind": "call.started",
        "payload": {"call_id": "c1"},
        "occurred_at": "2026-06-27T10:00:00.000Z",
        "created_at": "2026-09-21T14:13:20.000Z",
    }
    assert await store.add_event("c1", "ev2", "call.answered", {}, "x") is False

    assert await store.latest_recording("c1") is None
    store.note_recording("c1", "rec_a", "ready", "/r/rec_a.wav")
    store.clock.now += 1  # type: ignore[attr-defined]
    store.note_recording("c1", "rec_b", "in_progress")
    await store.flush()
    latest = await store.latest_recording("c1")
    assert latest is not None and (latest.recording_id, latest.state) == ("rec_b", "in_progress")
    await store.set_recording("c1", "rec_b", "ready")
    latest = await store.latest_recording("c1")
    assert latest is not None and latest.state == "ready"
    assert [r.recording_id for r in await store.recordings("c1")] == ["rec_b", "rec_a"]
    rec_a = await store.recording("rec_a")
    assert rec_a is not None and rec_a.path == "/r/rec_a.wav"
    with pytest.raises(ValueError, match="recording state"):
        await store.set_recording("c1", "rec_c", "done")


async def test_record_built_from_the_call_events(store: CallRecords) -> None:
    """The event writer's one line (`note_call_event`) keeps the call's record up to date."""
    base = {
        "call_id": "c1",
        "direction": "outbound",
        "from": "+254700000001",
        "to": "+254722000001",
        "number_id": "num_1",
        "clientRequestId": "crm-1",
    }
    t0 = datetime(2026, 6, 27, 10, 0, 0, tzinfo=UTC)
    store.note_call_event(make_event("call.started", "ws_1", base, t0))
    store.note_call_event(make_event("call.answered", "ws_1", base, t0 + timedelta(seconds=2)))
    final = base | {
        "status": "busy",
        "hangup_cause": "user_busy",
        "sip_code": 486,
        "reason": "callee_busy",
        "ended_at": "2026-06-27T10:00:09.000Z",
    }
    store.note_call_event(make_event("call.failed", "ws_1", final, t0 + timedelta(seconds=9)))
    store.note_call_event(make_event("number.released", "ws_1", {"number_id": "n"}))
    await store.flush()
    call = await store.get("c1")
    assert call is not None
    assert {
        k: call[k]
        for k in (
            "status",
            "direction",
            "local_e164",
            "remote_e164",
            "client_request_id",
            "started_at",
            "answered_at",
            "ended_at",
            "sip_code",
            "hangup_cause",
            "failure_code",
            "workspace_id",
        )
    } == {
        "status": "busy",
        "direction": "outbound",
        "local_e164": "+254700000001",
        "remote_e164": "+254722000001",
        "client_request_id": "crm-1",
        "started_at": "2026-06-27T10:00:00.000Z",
        "answered_at": "2026-06-27T10:00:02.000Z",
        "ended_at": "2026-06-27T10:00:09.000Z",
        "sip_code": 486,
        "hangup_cause": "user_busy",
        "failure_code": "callee_busy",
        "workspace_id": "ws_1",
    }
    assert [e.kind for e in await store.events("c1")] == [
        "call.started",
        "call.answered",
        "call.failed",
    ]


async def test_a_bad_write_fails_alone(store: CallRecords) -> None:
    """One job failing inside a group commit rolls back only itself."""
    ok = store.add_event("c1", "ev1", "call.started", {}, "t")
    bad = store.add_event("c1", "ev2", "call.started", {}, None)  # type: ignore[arg-type]
    ok2 = store.add_event("c1", "ev3", "call.started", {}, "t")
    results = await asyncio.gather(ok, bad, ok2, return_exceptions=True)
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], Exception)
    assert [e.id for e in await store.events("c1")] == ["ev1", "ev3"]


async def test_idempotency_claim_put_release(store: CallRecords) -> None:
    assert await store.idempotency_claim("k1", "h1", ["c1"]) is None
    again = await store.idempotency_claim("k1", "h1", ["c9"])
    assert again is not None and again.in_flight and again.call_ids == ["c1"]
    await store.idempotency_put("k1", 201, {"call_id": "c1"})
    rec = await store.idempotency_get("k1")
    assert rec is not None and (rec.status, rec.response, rec.body_hash) == (
        201,
        {"call_id": "c1"},
        "h1",
    )
    # released claims can be claimed again; completed ones cannot be released
    assert await store.idempotency_claim("k2", "h2", []) is None
    await store.idempotency_release("k2")
    assert await store.idempotency_get("k2") is None
    await store.idempotency_release("k1")
    assert await store.idempotency_get("k1") is not None
    # past the TTL the key is free again, even before prune
    store.clock.now += 86400 + 1  # type: ignore[attr-defined]
    assert await store.idempotency_get("k1") is None
    assert await store.idempotency_claim("k1", "h3", ["c3"]) is None


async def test_concurrent_claims_one_winner(store: CallRecords) -> None:
    results = await asyncio.gather(*(store.idempotency_claim("k", "h", []) for _ in range(20)))
    assert sum(r is None for r in results) == 1


async def test_prune(store: CallRecords) -> None:
    clock: Clock = store.clock  # type: ignore[attr-defined]
    await store.upsert_call(summary("old", "2026-06-20T10:00:00.000Z"))
    await store.add_event("old", "e-old", "call.started", {}, "t")
    await store.set_recording("old", "r-old", "ready")
    await store.idempotency_claim("k-old", "h", ["old"])
    clock.now += 6 * 86400
    await store.upsert_call(summary("new", "2026-06-26T10:00:00.000Z"))
    await store.add_event("new", "e-new", "call.started", {}, "t")
    await store.idempotency_claim("k-new", "h", ["new"])
    # 6 days on: calls are kept (>= 7 days), the old idempotency key is gone (24 h)
    assert await store.prune() == {"events": 0, "recordings": 0, "calls": 0, "idempotency": 1}
    clock.now += 1.5 * 86400
    counts = await store.prune()
    assert counts == {"events": 1, "recordings": 1, "calls": 1, "idempotency": 1}
    assert await store.get("old") is None and await store.get("new") is not None
    assert await store.events("old") == [] and await store.recordings("old") == []


async def test_prunes_by_itself_when_idle(tmp_path: Path) -> None:
    clock = Clock()
    records = await CallRecords.open(tmp_path / "c.sqlite3", clock=clock, prune_every_s=0.05)
    try:
        await records.upsert_call(summary("old", "2026-06-20T10:00:00.000Z"))
        clock.now += 8 * 86400
        for _ in range(100):
            await asyncio.sleep(0.02)
            if await records.get("old") is None:
                break
        assert await records.get("old") is None
    finally:
        await records.close()


async def test_restart_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    a = await CallRecords.open(path)
    a.note_call(summary("c1", "2026-06-27T10:00:00.000Z", status="completed"))
    a.note_event("c1", "ev1", "call.completed", {"status": "completed"}, "t")
    a.note_recording("c1", "rec1", "ready")
    await a.idempotency_claim("key", "hash", ["c1"])
    await a.idempotency_put("key", 201, {"call_id": "c1"})
    await a.close()  # close commits what was only noted
    await a.close()  # idempotent
    with pytest.raises(RuntimeError):
        await a.get("c1")
    b = await CallRecords.open(path)
    try:
        c = await b.get("c1")
        assert c is not None and c["status"] == "completed"
        assert [e.kind for e in await b.events("c1")] == ["call.completed"]
        rec = await b.latest_recording("c1")
        assert rec is not None and rec.state == "ready"
        idem = await b.idempotency_get("key")
        assert idem is not None and idem.response == {"call_id": "c1"}
    finally:
        await b.close()
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o600


async def test_open_failure_is_reported(tmp_path: Path) -> None:
    (tmp_path / "notadir").write_text("x")
    with pytest.raises(OSError):
        await CallRecords.open(tmp_path / "notadir" / "calls.sqlite3")
    records = CallRecords(tmp_path / "notadir" / "calls.sqlite3")
    with pytest.raises(OSError):
        await records.get("c1")


async def test_writes_do_not_block_the_loop(tmp_path: Path) -> None:
    """A slow commit (held here by a lock the writer thread waits on) leaves the loop free."""
    records = await CallRecords.open(tmp_path / "calls.sqlite3")
    gate = threading.Event()
    records._note(lambda db: gate.wait(5), "stall")  # the writer thread is now busy
    try:
        for i in range(200):
            records.note_event("c1", f"ev{i}", "call.started", {}, "t")
        t = time.monotonic()
        await asyncio.sleep(0.01)
        assert time.monotonic() - t < 0.5
        flushed = asyncio.ensure_future(records.flush())
        await asyncio.sleep(0.05)
        assert not flushed.done()
    finally:
        gate.set()
    await flushed
    assert len(await records.events("c1")) == 200
    await records.close()
