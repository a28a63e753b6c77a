"""The supervisor's conference rooms: who is in which room, on which worker, and the links.

A room is keyed by (workspace_id, name). Its participants live on any worker of the node; each
worker with participants mixes them in its own bridge (gateway/rooms/local.py). The room's hub
is the worker of its earliest remaining participant: it holds one media link per other worker
with participants, and each of those holds one link to it (a star, so nobody hears anyone
twice). Every change (join, leave, mute, hold, kick, end, a worker lost) ends in `_reconcile`,
which sends each concerned worker a declarative `RoomSync` (gateway/control/room_sync.py).

Links are opened in at most two rounds: a worker opening a link replies with its local address,
and the next round gives each end its peer's address.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.control.errors import FAILED, NOT_FOUND, OpRefused
from gateway.control.room_join import RoomJoin
from gateway.control.room_leave import RoomLeave
from gateway.control.room_sync import RoomLinkSpec, RoomMemberState, RoomNoticeSpec, RoomSync

if TYPE_CHECKING:
    from gateway.workers.ipc import Requester

log = logging.getLogger(__name__)

DEFAULT_MAX_PARTICIPANTS = 250
ROOM_FULL = "room_full"
SYNC_TIMEOUT_S = 5.0
# Flags a participant may give (`flags`, a string or a list); others are logged and ignored.
KNOWN_FLAGS = frozenset({"muted", "hold", "startOnEnter", "endOnExit", "beep"})


@dataclass
class Participant:
    call_id: str
    worker: int
    joined_at: float
    muted: bool = False
    hold: bool = False
    start_on_enter: bool = True
    end_on_exit: bool = False
    beep: bool = False
    record: bool = False
    flags: tuple[str, ...] = ()

    def view(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id, "worker": self.worker, "muted": self.muted,
            "hold": self.hold, "joined_at": self.joined_at,
            "start_on_enter": self.start_on_enter, "end_on_exit": self.end_on_exit,
            "recording": self.record,
            "flags": list(self.flags),
        }


@dataclass
class Room:
    workspace_id: str
    name: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    participants: dict[str, Participant] = field(default_factory=dict)
    started: bool = False
    ended: bool = False
    hub: int | None = None
    # (worker, peer) -> the local address of worker's link towards peer
    addrs: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    synced: set[int] = field(default_factory=set)  # workers holding a local part of it
    removed: dict[int, dict[str, str]] = field(default_factory=dict)  # worker -> {call: why}
    notices: list[RoomNoticeSpec] = field(default_factory=list)
    beep: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> tuple[str, str]:
        return (self.workspace_id, self.name)

    @property
    def workers(self) -> set[int]:
        return {p.worker for p in self.participants.values()}

    def peers(self, w: int) -> set[int]:
        if self.hub is None:
            return set()
        return self.workers - {w} if w == self.hub else {self.hub}

    def view(self, *, participants: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "workspace_id": self.workspace_id, "started": self.started,
            "participant_count": len(self.participants), "created_at": self.created_at,
            "hub_worker": self.hub, "workers": sorted(self.workers),
            "recording": any(p.record for p in self.participants.values()),
        }
        if participants:
            out["participants"] = [
                p.view() for p in sorted(self.participants.values(), key=lambda p: p.joined_at)
            ]
        return out


class RoomNotFound(LookupError):
    pass


class RoomAmbiguous(LookupError):
    def __init__(self, name: str, workspaces: list[str]) -> None:
        super().__init__(f"conference {name!r} exists in several workspaces: {workspaces}")
        self.workspaces = workspaces


class ParticipantNotFound(LookupError):
    pass


class RoomRegistry:
    """The node's rooms. `requester(worker)` is how a RoomSync reaches a worker (Node's)."""

    def __init__(self, requester: Callable[[int], Requester | None]) -> None:
        self._requester = requester
        self.rooms: dict[tuple[str, str], Room] = {}
        self._by_id: dict[str, Room] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def install(self, node: Any) -> None:
        """Answer the workers' room asks (`Node.handle_asks`)."""
        node.handle_asks(RoomJoin, self.on_join)
        node.handle_asks(RoomLeave, self.on_leave)

    # -- lookups (API) ------------------------------------------------------------------------
    def listing(self, workspace_id: str | None = None) -> list[Room]:
        return sorted(
            (r for r in self.rooms.values()
             if workspace_id is None or r.workspace_id == workspace_id),
            key=lambda r: r.created_at,
        )

    def find(self, name: str, workspace_id: str | None = None) -> Room:
        """The room `name` (in `workspace_id` when given); RoomAmbiguous when the name exists
        in several workspaces and none was given."""
        if workspace_id is not None:
            room = self.rooms.get((workspace_id, name))
            if room is None:
                raise RoomNotFound(name)
            return room
        found = [r for r in self.rooms.values() if r.name == name]
        if not found:
            raise RoomNotFound(name)
        if len(found) > 1:
            raise RoomAmbiguous(name, sorted(r.workspace_id for r in found))
        return found[0]

    def room_of(self, call_id: str) -> Room | None:
        return next((r for r in self.rooms.values() if call_id in r.participants), None)

    # -- asks from workers ----------------------------------------------------------------------
    async def on_join(self, worker: int, op: RoomJoin) -> dict[str, Any]:
        key = (op.workspace_id, op.name)
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room(op.workspace_id, op.name)
            self._by_id[room.id] = room
        async with room.lock:
            if room.ended:  # ended while we waited for its lock: a new one under that name
                return await self.on_join(worker, op)
            limit = op.max_participants or DEFAULT_MAX_PARTICIPANTS
            if op.call_id not in room.participants and len(room.participants) >= limit:
                if not room.participants:
                    self._forget(room)
                raise OpRefused(ROOM_FULL, f"conference {op.name!r} is full ({limit})")
            unknown = [f for f in op.flags if f not in KNOWN_FLAGS]
            if unknown:
                log.info("conference %s: call %s: flags ignored: %s", op.name, op.call_id,
                         unknown)
            flags = set(op.flags)
            p = Participant(
                call_id=op.call_id, worker=worker, joined_at=time.time(),
                muted=op.muted or "muted" in flags, hold="hold" in flags,
                start_on_enter=op.start_on_enter or "startOnEnter" in flags,
                end_on_exit=op.end_on_exit or "endOnExit" in flags,
                beep=op.beep or "beep" in flags, record=op.record, flags=tuple(op.flags),
            )
            room.participants[p.call_id] = p
            count = len(room.participants)
            room.notices.append(RoomNoticeSpec(event="join", call_id=p.call_id, count=count))
            if p.start_on_enter and not room.started:
                room.started = True
                room.notices.append(RoomNoticeSpec(event="start", count=count))
            room.beep = room.beep or p.beep
            log.info("conference %s/%s: %s joined on worker %d (%d participant(s), %s)",
                     room.workspace_id, room.name, p.call_id, worker, count,
                     "started" if room.started else "waiting")
            await self._reconcile(room)
            return {"room_id": room.id, "started": room.started, "count": count}

    async def on_leave(self, worker: int, op: RoomLeave) -> dict[str, Any]:
        room = self._by_id.get(op.room_id)
        if room is None:
            return {"count": 0}
        async with room.lock:
            self._remove(room, op.call_id, "left")
            await self._reconcile(room)
            return {"count": len(room.participants)}

    # -- live control (API) ---------------------------------------------------------------------
    async def set_flags(self, room: Room, call_id: str, *, muted: bool | None = None,
                        hold: bool | None = None) -> Participant:
        async with room.lock:
            p = room.participants.get(call_id)
            if p is None:
                raise ParticipantNotFound(call_id)
            if muted is not None:
                p.muted = muted
            if hold is not None:
                p.hold = hold
            log.info("conference %s: %s muted=%s hold=%s", room.name, call_id, p.muted, p.hold)
            await self._reconcile(room)
            return p

    async def kick(self, room: Room, call_id: str) -> None:
        async with room.lock:
            if call_id not in room.participants:
                raise ParticipantNotFound(call_id)
            self._remove(room, call_id, "kicked")
            await self._reconcile(room)

    async def end(self, room: Room) -> int:
        async with room.lock:
            n = len(room.participants)
            self._end(room, "ended")
            await self._reconcile(room)
            return n

    # -- node events ----------------------------------------------------------------------------
    async def worker_lost(self, worker: int) -> None:
        """The worker's participants are gone (their finals come from the node's worker_lost);
        the rooms go on for the others, re-homed when that worker was the hub."""
        for room in list(self.rooms.values()):
            if worker not in room.synced and worker not in room.workers:
                continue
            async with room.lock:
                room.synced.discard(worker)
                room.removed.pop(worker, None)
                room.addrs = {k: v for k, v in room.addrs.items() if worker not in k}
                for p in [p for p in room.participants.values() if p.worker == worker]:
                    self._remove(room, p.call_id, "worker_lost", notify_worker=False)
                await self._reconcile(room)

    def call_ended(self, call_id: str) -> None:
        """A call is over on its worker: out of its room, should its verb not have said so."""
        room = self.room_of(call_id)
        if room is None:
            return
        task = asyncio.create_task(self._leave_ended(room, call_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _leave_ended(self, room: Room, call_id: str) -> None:
        async with room.lock:
            if call_id in room.participants:
                self._remove(room, call_id, "left")
                await self._reconcile(room)

    # -- state ------------------------------------------------------------------------------------
    def _remove(self, room: Room, call_id: str, why: str, *, notify_worker: bool = True) -> None:
        p = room.participants.pop(call_id, None)
        if p is None:
            return
        if notify_worker:
            room.removed.setdefault(p.worker, {})[call_id] = why
        count = len(room.participants)
        room.notices.append(RoomNoticeSpec(event="leave", call_id=call_id, count=count))
        room.beep = room.beep or p.beep
        log.info("conference %s/%s: %s left (%s; %d participant(s))", room.workspace_id,
                 room.name, call_id, why, count)
        if p.end_on_exit and why != "ended":
            self._end(room, "ended")
        elif not room.participants:
            self._end(room, "ended")

    def _end(self, room: Room, why: str) -> None:
        if room.ended:
            return
        for call_id in list(room.participants):
            p = room.participants.pop(call_id)
            room.removed.setdefault(p.worker, {})[call_id] = why
            room.notices.append(
                RoomNoticeSpec(event="leave", call_id=call_id, count=len(room.participants))
            )
        room.notices.append(RoomNoticeSpec(event="end", count=0))
        room.ended = True
        self._forget(room)
        log.info("conference %s/%s: ended", room.workspace_id, room.name)

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.key) is room:
            del self.rooms[room.key]
        # kept by id until its last sync: a late RoomLeave finds it ended
        if not room.synced:
            self._by_id.pop(room.id, None)

    async def _reconcile(self, room: Room) -> None:
        """Send every concerned worker its part of the room (holding room.lock)."""
        workers = room.workers
        if room.hub not in workers:
            first = min(room.participants.values(), key=lambda p: p.joined_at, default=None)
            old, room.hub = room.hub, (first.worker if first is not None else None)
            if old is not None and room.hub is not None:
                log.info("conference %s: hub moved from worker %d to %d", room.name, old,
                         room.hub)
        # links no longer wanted are forgotten (the worker closes them)
        room.addrs = {(w, q): a for (w, q), a in room.addrs.items()
                      if w in workers and q in room.peers(w)}
        targets = workers | room.synced | set(room.removed)
        notices, room.notices = room.notices, []
        beep, room.beep = room.beep, False
        removed, room.removed = room.removed, {}
        missing = {w for w in targets if any((q, w) not in room.addrs for q in room.peers(w))}
        await asyncio.gather(*(
            self._sync(room, w, notices=notices, beep=beep, removed=removed.get(w, {}))
            for w in targets
        ))
        # second round: the ends that did not know their peer's address now do
        again = {w for w in missing & room.workers
                 if all((q, w) in room.addrs for q in room.peers(w))}
        if again:
            await asyncio.gather(*(self._sync(room, w) for w in again))
        if room.ended and not room.synced:
            self._by_id.pop(room.id, None)

    async def _sync(self, room: Room, w: int, *, notices: list[RoomNoticeSpec] | None = None,
                    beep: bool = False, removed: dict[str, str] | None = None) -> None:
        members = [RoomMemberState(call_id=p.call_id, muted=p.muted, hold=p.hold)
                   for p in room.participants.values() if p.worker == w]
        links = []
        for q in sorted(room.peers(w)):
            addr = room.addrs.get((q, w))
            links.append(RoomLinkSpec(peer=q, host=addr[0] if addr else None,
                                      port=addr[1] if addr else None))
        ended = room.ended or not members
        op = RoomSync(
            room_id=room.id, name=room.name, started=room.started, ended=ended,
            members=members, links=links, removed=removed or {}, notices=notices or [],
            beep=beep,
        )
        requester = self._requester(w)
        try:
            if requester is None:
                raise OpRefused(NOT_FOUND, f"worker {w} is not running")
            reply = await requester.request(op, SYNC_TIMEOUT_S)
            if not reply.ok:
                raise OpRefused(reply.code or FAILED, reply.message or "")
        except Exception as e:  # a dead worker: its worker_lost cleans up after it
            log.warning("conference %s: sync of worker %d failed: %s", room.name, w, e)
            return
        if ended:
            room.synced.discard(w)
        else:
            room.synced.add(w)
        for q, host, port in reply.result.get("links", []):
            if int(q) in room.peers(w):
                room.addrs[(w, int(q))] = (str(host), int(port))
