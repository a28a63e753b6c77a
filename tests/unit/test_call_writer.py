"""A call's event writer never blocks its loop, and a call's final is acknowledged only once it
is on disk (the worker keeps the call until then)."""

import asyncio
import hashlib
import sqlite3
import threading
import time
from pathlib import Path

from gateway.calls.identity import CallIdentity
from gateway.calls.outcome import Outcome
from gateway.calls.writer import CallEventWriter
from gateway.control.originate import Destination
from gateway.events.outbox import AsyncOutbox, Outbox
from gateway.workers.protocol import CallEvent

DEST = Destination(url="https://cp.example/events", secret="whsec_x", policy="control_plane")
DONE = Outcome(status="completed", hangup_cause="normal_clearing", sip_code=200, reason=None,
               message=None)


def _identity(call_id: str = "call-1") -> CallIdentity:
    return CallIdentity(call_id=call_id, direction="inbound", from_="+254700000001",
                        to="+254711000002", number_id="num_1", workspace_id="ws_1",
                        created_at=time.time())


def _hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another process's long write transaction on the outbox file."""
    held = threading.Event()

    def run() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        db.execute("COMMIT")
        db.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    held.wait(5)
    return t


async def test_emit_does_not_wait_for_the_disk_and_tells_only_once_stored(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = await AsyncOutbox.open(path)
    told: list[CallEvent] = []
    writer = CallEventWriter(outbox, DEST, _identity(), on_event=told.append)
    holder = _hold_write_lock(path, 1.0)
    t0 = time.monotonic()
    writer.started()
    writer.answered(time.time())
    final = writer.final(DONE, answered_at=time.time() - 5, ended_at=time.time())
    assert time.monotonic() - t0 < 0.5  # the loop went on while the file was locked (1 s)
    await asyncio.sleep(0.3)
    assert told == [] and not final.done()  # nothing is acknowledged before it is on disk
    await asyncio.wait_for(writer.settled(), 10)
    assert final.result() is True
    assert [(e.kind, e.stored) for e in told] == [
        ("call.started", True), ("call.answered", True), ("call.completed", True)
    ]
    holder.join()
    again = writer.final(DONE, answered_at=None, ended_at=time.time())
    assert await again is False  # one final per call, the writer's own guard
    await outbox.aclose()
    with Outbox(path) as sync:
        assert [r.kind for r in sync.rows_for_call("call-1")] == [
            "call.started", "call.answered", "call.completed"
        ]


async def test_a_second_writer_of_the_same_call_gets_false_and_no_event(tmp_path: Path) -> None:
    """The worker and the supervisor (worker_lost) racing: the outbox's UNIQUE rule decides."""
    path = tmp_path / "outbox.sqlite3"
    a, b = await AsyncOutbox.open(path), await AsyncOutbox.open(path)
    told: list[CallEvent] = []
    wa = CallEventWriter(a, DEST, _identity("c"), on_event=told.append)
    wb = CallEventWriter(b, DEST, _identity("c"), on_event=told.append)
    results = await asyncio.gather(
        wa.final(DONE, answered_at=time.time(), ended_at=time.time()),
        wb.final(DONE, answered_at=time.time(), ended_at=time.time()),
    )
    assert sorted(results) == [False, True]
    assert len(told) == 1
    await a.aclose()
    await b.aclose()


async def test_recording_ready_hashes_off_the_loop_and_is_stored_first(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = await AsyncOutbox.open(path)
    told: list[CallEvent] = []
    writer = CallEventWriter(outbox, DEST, _identity(), on_event=told.append,
                             recording_url=lambda rid: f"https://api.example/v1/recordings/{rid}")
    rec = tmp_path / "r.wav"
    rec.write_bytes(b"RIFF" + bytes(range(256)) * 1000)
    url = await writer.recording_ready("rec_1", rec, 2.5, "wav")
    assert url == "https://api.example/v1/recordings/rec_1"
    (ev,) = told  # stored before recording_ready returned
    assert ev.kind == "call.recording.ready"
    assert ev.data["sha256"] == hashlib.sha256(rec.read_bytes()).hexdigest()
    assert ev.data["size_bytes"] == rec.stat().st_size
    await outbox.aclose()
