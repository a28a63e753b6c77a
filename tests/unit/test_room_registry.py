"""The supervisor's room registry against fake workers: membership, the hub and its star of
links (addresses exchanged in at most two rounds), start/end rules, kick, a lost worker."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.control.errors import OpRefused
from gateway.control.room_join import RoomJoin
from gateway.control.room_leave import RoomLeave
from gateway.control.room_sync import RoomSync
from gateway.rooms.registry import RoomAmbiguous, RoomNotFound, RoomRegistry
from gateway.workers.protocol import Reply


class FakeWorker:
    """Answers RoomSync like gateway/rooms/local.py: a link per listed peer, its address."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.syncs: list[RoomSync] = []
        self.alive = True

    async def request(self, op: Any, timeout: float = 5.0) -> Reply:
        assert isinstance(op, RoomSync)
        if not self.alive:
            raise ConnectionError("gone")
        self.syncs.append(op)
        links = [] if op.ended else [[s.peer, "127.0.0.1", self.port(s.peer)]
                                     for s in op.links]
        return Reply(id=1, ok=True, result={"links": links})

    def port(self, peer: int) -> int:
        return 20000 + 100 * self.index + peer

    @property
    def last(self) -> RoomSync:
        return self.syncs[-1]


@pytest.fixture
def node() -> tuple[RoomRegistry, dict[int, FakeWorker]]:
    workers = {i: FakeWorker(i) for i in range(4)}
    reg = RoomRegistry(lambda i: workers[i] if workers[i].alive else None)  # type: ignore[arg-type,return-value]
    return reg, workers


def join(call_id: str, name: str = "r", ws: str = "ws_1", **kw: Any) -> RoomJoin:
    return RoomJoin(call_id=call_id, workspace_id=ws, name=name, **kw)


def links_of(w: FakeWorker) -> dict[int, tuple[str | None, int | None]]:
    return {s.peer: (s.host, s.port) for s in w.last.links}


async def test_a_star_of_links_around_the_first_members_worker(node):
    reg, ws = node
    for i, w in enumerate((0, 1, 1, 2)):
        await reg.on_join(w, join(f"c{i}"))
    room = reg.find("r")
    assert room.hub == 0 and room.workers == {0, 1, 2}
    # every end knows its peer's address: the hub one link per worker, the others one to it
    assert links_of(ws[0]) == {1: ("127.0.0.1", ws[1].port(0)), 2: ("127.0.0.1", ws[2].port(0))}
    assert links_of(ws[1]) == {0: ("127.0.0.1", ws[0].port(1))}
    assert links_of(ws[2]) == {0: ("127.0.0.1", ws[0].port(2))}
    assert {m.call_id for m in ws[1].last.members} == {"c1", "c2"}
    assert not ws[3].syncs
    assert ws[0].last.started


async def test_max_participants_refuses_and_start_on_enter_waits(node):
    reg, ws = node
    r = await reg.on_join(0, join("a", start_on_enter=False))
    assert r["started"] is False and r["count"] == 1
    assert [n.event for n in ws[0].last.notices] == ["join"]
    with pytest.raises(OpRefused) as e:
        await reg.on_join(1, join("b", max_participants=1))
    assert e.value.code == "room_full"
    r = await reg.on_join(1, join("c"))
    assert r["started"] is True and r["count"] == 2
    assert [n.event for n in ws[1].syncs[0].notices] == ["join", "start"]


async def test_end_on_exit_ends_it_for_everyone(node):
    reg, ws = node
    await reg.on_join(0, join("a"))
    r = await reg.on_join(1, join("b", end_on_exit=True))
    await reg.on_leave(1, RoomLeave(call_id="b", room_id=r["room_id"]))
    assert ws[0].last.ended and ws[0].last.removed == {"a": "ended"}
    assert ws[1].last.ended
    assert [n.event for n in ws[0].last.notices] == ["leave", "leave", "end"]
    with pytest.raises(RoomNotFound):
        reg.find("r")
    # a late leave of the ended room is harmless
    assert await reg.on_leave(0, RoomLeave(call_id="a", room_id=r["room_id"])) == {"count": 0}


async def test_mute_hold_and_kick(node):
    reg, ws = node
    await reg.on_join(0, join("a"))
    await reg.on_join(1, join("b"))
    room = reg.find("r")
    await reg.set_flags(room, "b", muted=True)
    assert [(m.call_id, m.muted, m.hold) for m in ws[1].last.members] == [("b", True, False)]
    await reg.set_flags(room, "b", hold=True)
    assert [(m.muted, m.hold) for m in ws[1].last.members] == [(True, True)]
    await reg.kick(room, "b")
    assert ws[1].last.removed == {"b": "kicked"} and ws[1].last.ended  # no member left there
    assert ws[0].last.links == [] and not ws[0].last.ended
    assert reg.find("r").participants.keys() == {"a"}


async def test_a_lost_hub_is_rehomed(node):
    reg, ws = node
    await reg.on_join(0, join("a"))
    await reg.on_join(1, join("b"))
    await reg.on_join(2, join("c"))
    ws[0].alive = False
    await reg.worker_lost(0)
    room = reg.find("r")
    assert room.hub == 1 and set(room.participants) == {"b", "c"}
    assert links_of(ws[1]) == {2: ("127.0.0.1", ws[2].port(1))}
    assert links_of(ws[2]) == {1: ("127.0.0.1", ws[1].port(2))}
    assert [n.event for n in ws[2].syncs[-2].notices] == ["leave"]


async def test_names_are_per_workspace(node):
    reg, _ = node
    await reg.on_join(0, join("a", ws="ws_1"))
    await reg.on_join(1, join("b", ws="ws_2"))
    with pytest.raises(RoomAmbiguous) as e:
        reg.find("r")
    assert e.value.workspaces == ["ws_1", "ws_2"]
    assert reg.find("r", "ws_2").participants.keys() == {"b"}
    assert [r.workspace_id for r in reg.listing("ws_1")] == ["ws_1"]
