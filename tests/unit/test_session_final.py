"""A call's session is over (its worker lets it go) only once its final event is on disk, and
waiting for the disk never stalls the loop."""

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from dsl.interpreter import Fetch
from gateway.calls.identity import CallIdentity
from gateway.calls.writer import CallEventWriter
from gateway.control.originate import Destination
from gateway.events.outbox import AsyncOutbox, Outbox
from gateway.session import CallSession
from media.call import CallEnd

DEST = Destination(url="https://cp.example/events", secret="whsec_x", policy="control_plane")


class EndedCall:
    """A SIP call that was answered and is already over (the caller hung up)."""

    answered = True
    ended = True
    media_failure = None

    def __init__(self) -> None:
        self.answered_at = time.time() - 3
        self.on_answer: list[object] = []
        self.end = CallEnd(200, "OK", "remote", True, time.time())

    async def wait_ended(self) -> CallEnd:
        return self.end

    async def hangup(self, code: int) -> None:
        pass

    def reject_now(self, code: int, headers: object = None) -> None:
        pass


async def test_final_is_on_disk_before_the_call_is_over(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = await AsyncOutbox.open(path)
    session, _ = _session(tmp_path, outbox, final_retry_s=None)
    on_disk_at_final: list[bool] = []

    def on_final(outcome: object, end: CallEnd) -> None:
        with Outbox(path) as sync:
            on_disk_at_final.append(sync.has_final("call-1"))

    session.on_final = on_final
    # another process holds the outbox's write lock for a second
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(5)
        db.execute("COMMIT")
        db.close()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    held.wait(5)
    run = asyncio.create_task(session.run(inbound_start=False))
    ticks = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks > 5, "the loop stalled waiting for the disk"  # blocked: 1
    assert session.outcome is not None and session.outcome.status == "completed"
    assert not run.done() and on_disk_at_final == []  # decided, not yet acknowledged
    release.set()
    await asyncio.wait_for(run, 10)
    assert on_disk_at_final == [True]
    holder.join()
    await outbox.aclose()


def _session(
    tmp_path: Path, outbox: AsyncOutbox, final_retry_s: tuple[float, ...] | None = (0.05, 0.1)
) -> tuple[CallSession, CallEventWriter]:
    """A session whose call has already ended; `final_retry_s` None keeps the writer's own."""
    identity = CallIdentity(call_id="call-1", direction="inbound", from_="+254700000001",
                            to="+254711000002", number_id="num_1", workspace_id="ws_1",
                            created_at=time.time())
    writer = CallEventWriter(outbox, DEST, identity)
    if final_retry_s is not None:
        writer.final_retry_s = final_retry_s
    session = CallSession(
        call=EndedCall(),  # type: ignore[arg-type]
        identity=identity, writer=writer, app=None,  # type: ignore[arg-type]
        call_fields={}, first_document=Fetch("https://app.example/voice", "POST"),
        voice_callback_url="https://app.example/voice",
        prompts=SimpleNamespace(beep=None),  # type: ignore[arg-type]
        recordings_dir=tmp_path,
    )
    return session, writer


async def _read_only(outbox: AsyncOutbox, on: bool) -> None:
    await outbox.committer.submit(
        lambda db: db.execute(f"PRAGMA query_only = {int(on)}"), read=True
    )


async def test_a_final_that_cannot_be_stored_does_not_end_the_call(tmp_path: Path) -> None:
    """The worker must not let the call go (CallEnded) without its final on disk: it is told
    the final is lost instead, and exits, so the supervisor writes the final."""
    outbox = await AsyncOutbox.open(tmp_path / "outbox.sqlite3")
    session, writer = _session(tmp_path, outbox)
    finals: list[object] = []
    lost: list[bool] = []
    session.on_final = lambda outcome, end: finals.append(outcome)
    writer.on_final_lost = lambda: lost.append(True)
    await _read_only(outbox, True)
    await asyncio.wait_for(session.run(inbound_start=False), 10)
    assert finals == [] and lost == [True]
    await _read_only(outbox, False)
    assert not (await outbox.rows_for_call("call-1"))
    await outbox.aclose()


async def test_a_final_stored_on_a_retry_ends_the_call(tmp_path: Path) -> None:
    outbox = await AsyncOutbox.open(tmp_path / "outbox.sqlite3")
    session, writer = _session(tmp_path, outbox)
    finals: list[object] = []
    session.on_final = lambda outcome, end: finals.append(outcome)
    writer.on_final_lost = lambda: finals.append("lost")
    await _read_only(outbox, True)
    run = asyncio.create_task(session.run(inbound_start=False))
    await asyncio.sleep(0.02)
    await _read_only(outbox, False)
    await asyncio.wait_for(run, 10)
    assert len(finals) == 1 and finals[0] != "lost"
    assert any(r.final for r in await outbox.rows_for_call("call-1"))
    await outbox.aclose()
