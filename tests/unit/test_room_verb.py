"""The `conference` verb against a fake call and fake rooms: full room, kick, waitUrl loop,
status events, keypad entries, recording, hangup."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dsl.context import RoomEntry, RoomLeft, RoomNotice, RoomRefused
from dsl.interpreter import Interpreter
from dsl.verbs.conference import FULL_MESSAGE
from tests.unit.test_dsl_fakes import Fake, FakeLeg, doc, say

STATUS_URL = "https://app.example/conf/status"
WAIT_URL = "https://app.example/conf/wait"


class LiveLeg(FakeLeg):
    """`wait` sleeps while the call lives (the verb watches the call with it)."""

    async def wait(self, seconds: float) -> None:
        self._check()
        try:
            await asyncio.wait_for(self._ended.wait(), seconds)
        except TimeoutError:
            return
        self._check()


class FakeSeat:
    def __init__(self, started: bool, recording: tuple[Path, float] | None = None) -> None:
        self.room_id = "room-1"
        self.started = asyncio.Event()
        if started:
            self.started.set()
        self.left: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.notices: asyncio.Queue[RoomNotice] = asyncio.Queue()
        self.leaves = 0
        self.recording = recording
        self.hold_tone = False

    def hold_tone_while_waiting(self) -> None:
        self.hold_tone = True

    async def leave(self) -> RoomLeft:
        self.leaves += 1
        return RoomLeft(0, self.recording)


class FakeRooms:
    def __init__(self, seat: FakeSeat | None) -> None:
        self.seat = seat
        self.entries: list[RoomEntry] = []

    async def join(self, call_id: str, entry: RoomEntry) -> FakeSeat:
        self.entries.append(entry)
        if self.seat is None:
            raise RoomRefused("room_full", "full")
        return self.seat


def fake_with(tmp: Path, seat: FakeSeat | None) -> tuple[Fake, FakeRooms]:
    fake = Fake(tmp)
    fake.leg = LiveLeg(fake.ops)
    fake.ctx.leg = fake.leg
    rooms = FakeRooms(seat)
    fake.ctx.rooms = rooms
    return fake, rooms


def conference(**params: Any) -> dict[str, Any]:
    return {"conference": {"name": "room", **params}}


async def run_until(fake: Fake, document: Any, pred: Any, timeout: float = 2.0) -> Any:
    task = asyncio.ensure_future(Interpreter(fake.ctx).run(document))
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, fake.ops
        await asyncio.sleep(0.01)
    return task


async def test_a_full_room_says_so_and_the_document_goes_on(tmp_path: Path) -> None:
    fake, rooms = fake_with(tmp_path, None)
    result = await Interpreter(fake.ctx).run(doc(conference(maxParticipants=1), say("after")))
    assert rooms.entries[0].max_participants == 1
    assert fake.said() == [FULL_MESSAGE, "after"]
    assert [e.code for e in result.errors] == ["conference_room_full"]


async def test_kicked_the_document_goes_on_and_status_events_are_posted(
        tmp_path: Path) -> None:
    seat = FakeSeat(started=True)
    fake, rooms = fake_with(tmp_path, seat)
    fake.app.routes[STATUS_URL] = {}
    task = await run_until(
        fake,
        doc(conference(statusEventsCallbackUrl=STATUS_URL, statusEvents="join leave",
                       muted=True, flags="endOnExit beep"),
            say("after")),
        lambda: rooms.entries)
    seat.notices.put_nowait(RoomNotice("start", "", 1))  # not subscribed
    seat.notices.put_nowait(RoomNotice("join", "call-1", 1))
    await asyncio.sleep(0.05)
    seat.notices.put_nowait(RoomNotice("leave", "call-1", 0))  # the kick's, still posted
    seat.left.set_result("kicked")
    result = await asyncio.wait_for(task, 2)
    await asyncio.sleep(0.05)
    assert result.ended_by == "document_end" and fake.said() == ["after"]
    assert seat.leaves == 1
    entry = rooms.entries[0]
    assert entry.muted and entry.flags == ("endOnExit", "beep") and entry.wait_tone
    posts = [op[3] for op in fake.kinds("fetch") if op[1] == STATUS_URL]
    assert [(p["StatusEvent"], p["ParticipantCount"]) for p in posts] == [
        ("join", "1"), ("leave", "0")]
    assert posts[0]["ConferenceName"] == "room"


async def test_wait_url_loops_until_the_room_starts(tmp_path: Path) -> None:
    seat = FakeSeat(started=False)
    fake, rooms = fake_with(tmp_path, seat)
    fake.app.routes[WAIT_URL] = {"actions": [say("hold on"), {"play": {"url": "m.wav"}}]}
    task = await run_until(
        fake, doc(conference(waitUrl=WAIT_URL)),
        lambda: len([op for op in fake.ops if op[0] == "played"]) >= 3)
    assert rooms.entries[0].wait_tone is False
    seat.started.set()
    await asyncio.sleep(0.05)
    plays = len(fake.kinds("play"))
    await asyncio.sleep(0.1)
    assert len(fake.kinds("play")) == plays, "the wait music stopped when the room started"
    assert fake.said()[:3] == ["hold on", "m", "hold on"]
    fake.leg.end()
    result = await asyncio.wait_for(task, 2)
    assert result.ended_by == "caller" and seat.leaves == 1


async def test_keypad_entries_are_posted_while_in_the_room(tmp_path: Path) -> None:
    seat = FakeSeat(started=True)
    fake, _ = fake_with(tmp_path, seat)
    digits_url = "https://app.example/conf/digits"
    fake.app.routes[digits_url] = {"actions": [say("ignored")]}
    task = await run_until(
        fake, doc(conference(collectDigits=True, digitsCallbackUrl=digits_url, numDigits=2)),
        lambda: ("listen", True) in fake.ops)
    fake.leg.press("1", "2", "3", "4", "5")
    await asyncio.sleep(0.05)
    seat.left.set_result("ended")
    await asyncio.wait_for(task, 2)
    posts = [op[3]["Digits"] for op in fake.kinds("fetch") if op[1] == digits_url]
    assert posts == ["12", "34"]
    assert ("listen", False) in fake.ops and fake.said() == []


async def test_a_recording_is_reported_on_leaving(tmp_path: Path) -> None:
    wav = tmp_path / "r.wav"
    seat = FakeSeat(started=True, recording=(wav, 3.5))
    fake, rooms = fake_with(tmp_path, seat)
    task = await run_until(fake, doc(conference(record=True)), lambda: rooms.entries)
    assert rooms.entries[0].record_to is not None
    assert rooms.entries[0].record_to.parent == tmp_path
    fake.leg.end()
    result = await asyncio.wait_for(task, 2)
    assert result.ended_by == "caller"
    [ready] = fake.kinds("recording_ready")
    assert ready[2:] == (wav, 3.5, "wav")


async def test_without_rooms_it_is_unsupported(tmp_path: Path) -> None:
    from dsl.context import VoiceAppError

    fake = Fake(tmp_path)
    with pytest.raises(VoiceAppError) as e:
        await Interpreter(fake.ctx).run(doc(conference()))
    assert e.value.code == "verb_unsupported"


async def test_a_wait_url_that_fails_gives_the_hold_tone(tmp_path: Path) -> None:
    seat = FakeSeat(started=False)
    fake, _ = fake_with(tmp_path, seat)  # no route for WAIT_URL: the fetch fails
    task = await run_until(fake, doc(conference(waitUrl=WAIT_URL)), lambda: seat.hold_tone)
    fake.leg.end()
    result = await asyncio.wait_for(task, 2)
    assert [e.code for e in result.errors] == ["conference_wait_url"]
