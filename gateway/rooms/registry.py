"""The supervisor's conference rooms: who is in which room, on which worker, and the links.

A room is keyed by (workspace_id, name). Its participants live on any worker of the node; each
worker with participants mixes them in its own bridge (gateway/rooms/local.py). The room's hub
is the worker of its earliest remaining participant: it holds one media link per other worker
with participants, and each of those holds one link to it (a star, so nobody hears anyone
twice). Every change (join, leave, mute, hold, kick, end, a worker lost) ends in `_reconcile`,
which sends each concerned worker a declarative `RoomSync` (gateway/control/room_sync.py).

Links are opened in at most two rounds: a worker opening a link replies with its local address,
and the next round gives each end its peer's address.

Across nodes (with a `[cluster]`, gateway/cluster/): a room's home node is picked by rendezvous
hashing; its registry is the room's, and it keeps another node's participants under a virtual
worker id (negative) whose sync is a `RoomPart` POSTed to that node. The other node keeps a
*node part* (`Room.home` set): its own participants on its own workers, its own hub, and
external peers (`Room.ext`, the home's side of each link) that its hub links to. Joins, leaves
and control go to the home; the home's part syncs tell the node what changed. Three levels:
worker -> node hub -> home hub, still a tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from gateway.cluster.membership import PeerUnavailable
from gateway.control.errors import FAILED, NOT_FOUND, OpRefused
from gateway.control.room_join import RoomJoin
from gateway.control.room_leave import RoomLeave
from gateway.control.room_part import RoomPart, RoomPartLink
from gateway.control.room_sync import RoomLinkSpec, RoomMemberState, RoomNoticeSpec, RoomSync

if TYPE_CHECKING:
    from gateway.cluster.membership import Cluster
    from gateway.workers.ipc import Requester

log = logging.getLogger(__name__)

DEFAULT_MAX_PARTICIPANTS = 250
ROOM_FULL = "room_full"
SYNC_TIMEOUT_S = 5.0
# A join forwarded to the home node waits this long: under the worker's own ask timeout
# (rooms/local.py ASK_TIMEOUT_S, 10 s), over the home's two rounds of syncs.
JOIN_TIMEOUT_S = 8.0
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
    node: str = ""  # its node (cluster); "" without one
    node_worker: int | None = None  # its worker on that node when not this one

    def view(self) -> dict[str, Any]:
        worker = self.node_worker if self.worker < 0 else self.worker
        return {
            "call_id": self.call_id, "worker": worker, "node": self.node or None,
            "muted": self.muted,
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
    home: str | None = None  # a node part: the room's home node (None: the room is here)
    home_node: str = ""  # the home's node id ("" without a cluster)
    # node part: the external ends its hub links to (virtual id -> peer key, its address)
    ext: dict[int, str] = field(default_factory=dict)
    ext_ids: dict[str, int] = field(default_factory=dict)
    ext_addr: dict[int, tuple[str, int]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.workspace_id, self.name)

    @property
    def workers(self) -> set[int]:
        return {p.worker for p in self.participants.values()}

    def peers(self, w: int) -> set[int]:
        if self.hub is None:
            return set()
        return (self.workers - {w}) | set(self.ext) if w == self.hub else {self.hub}

    def addr_of(self, q: int, w: int) -> tuple[str, int] | None:
        """The address of q's link end towards w."""
        return self.ext_addr.get(q) if q in self.ext else self.addrs.get((q, w))

    def view(self, *, participants: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "workspace_id": self.workspace_id, "started": self.started,
            "participant_count": len(self.participants), "created_at": self.created_at,
            "hub_worker": self.hub if self.hub is None or self.hub >= 0 else None,
            "workers": sorted(w for w in self.workers if w >= 0),
            "home_node": self.home_node or None,
            "nodes": sorted({p.node for p in self.participants.values() if p.node}),
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

    def __init__(self, requester: Callable[[int], Requester | None],
                 cluster: Cluster | None = None) -> None:
        self._requester = requester
        self.rooms: dict[tuple[str, str], Room] = {}
        self._by_id: dict[str, Room] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.cluster = cluster
        self.node_id = cluster.node_id if cluster is not None else ""
        self._virtual: dict[str, int] = {}  # another node -> its virtual worker id here
        self._node_of: dict[int, str] = {}
        self._pending: dict[str, int] = {}  # call forwarded to its home -> its worker here
        if cluster is not None:
            cluster.on_dead.append(self.node_lost)

    def install(self, node: Any) -> None:
        """Answer the workers' room asks (`Node.handle_asks`)."""
        node.handle_asks(RoomJoin, self.on_join)
        node.handle_asks(RoomLeave, self.on_leave)

    # -- lookups (API) ------------------------------------------------------------------------
    def listing(self, workspace_id: str | None = None) -> list[Room]:
        return sorted(
            (r for r in self.rooms.values() if r.home is None
             and (workspace_id is None or r.workspace_id == workspace_id)),
            key=lambda r: r.created_at,
        )

    def find(self, name: str, workspace_id: str | None = None) -> Room:
        """The room `name` (in `workspace_id` when given); RoomAmbiguous when the name exists
        in several workspaces and none was given."""
        if workspace_id is not None:
            room = self.rooms.get((workspace_id, name))
            if room is None or room.home is not None:
                raise RoomNotFound(name)
            return room
        found = [r for r in self.rooms.values() if r.name == name and r.home is None]
        if not found:
            raise RoomNotFound(name)
        if len(found) > 1:
            raise RoomAmbiguous(name, sorted(r.workspace_id for r in found))
        return found[0]

    def room_of(self, call_id: str) -> Room | None:
        return next((r for r in self.rooms.values() if call_id in r.participants), None)

    # -- asks from workers ----------------------------------------------------------------------
    async def on_join(self, worker: int, op: RoomJoin) -> dict[str, Any]:
        home = await self._home_for(op.workspace_id, op.name)
        if home is not None:
            return await self._join_at(home, worker, op)
        return await self.join_here(worker, op)

    async def _home_for(self, workspace_id: str, name: str) -> str | None:
        """The room's home when it is another node (None: this one). A live room keeps its
        home: a node part knows it, else the live peers are asked (a node that came back
        since would win the rendezvous and split the room); a new room's is the rendezvous'."""
        if self.cluster is None:
            return None
        room = self.rooms.get((workspace_id, name))
        if room is not None and not room.ended:
            return room.home
        cluster = self.cluster
        path = f"/cluster/v1/conferences/{quote(name, safe='')}?workspace_id={quote(workspace_id)}"

        async def homes(node: str) -> bool:
            try:
                status, _ = await cluster.request(node, "GET", path)
            except PeerUnavailable:
                return False
            return status == 200

        peers = cluster.live_peers()
        found = [n for n, yes in zip(peers, await asyncio.gather(*map(homes, peers)),
                                     strict=True) if yes]
        if found:
            return found[0]
        home = cluster.home_of(workspace_id, name)
        return None if home == self.node_id else home

    async def _join_at(self, home: str, worker: int, op: RoomJoin) -> dict[str, Any]:
        """Join at the room's home node; its part sync (during the join) sets up ours."""
        assert self.cluster is not None
        self._pending[op.call_id] = worker
        try:
            status, body = await self.cluster.request(
                home, "POST", "/cluster/v1/rooms/join",
                {"node": self.node_id, "worker": worker, "op": op.model_dump()},
                timeout=JOIN_TIMEOUT_S)
        except PeerUnavailable as e:
            # the home may have taken it in before the answer was lost: take it out again
            part = self.rooms.get((op.workspace_id, op.name))
            if part is not None and part.home == home:
                with contextlib.suppress(PeerUnavailable):
                    await self.cluster.post(home, "/cluster/v1/rooms/leave",
                                            {"call_id": op.call_id, "room_id": part.id})
            raise OpRefused(FAILED, f"the room's home node {home} did not answer: {e}") from None
        finally:
            self._pending.pop(op.call_id, None)
        if status != 200:
            raise OpRefused(str(body.get("code", FAILED)), str(body.get("message", "")))
        return body

    def virtual(self, node: str) -> int:
        """The virtual worker id under which this registry keeps `node`'s participants."""
        v = self._virtual.get(node)
        if v is None:
            v = self._virtual[node] = -(len(self._virtual) + 1)
            self._node_of[v] = node
        return v

    async def join_here(self, worker: int, op: RoomJoin, *, node: str = "",
                        node_worker: int | None = None) -> dict[str, Any]:
        """Join a room homed here (`worker` is virtual for another node's participant)."""
        key = (op.workspace_id, op.name)
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room(op.workspace_id, op.name, home_node=self.node_id)
            self._by_id[room.id] = room
        async with room.lock:
            if room.ended:  # ended while we waited for its lock: a new one under that name
                return await self.join_here(worker, op, node=node, node_worker=node_worker)
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
                node=node or self.node_id, node_worker=node_worker,
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
        if room.home is not None and self.cluster is not None:
            # the home decides; its part sync takes the call out here
            try:
                return await self.cluster.post(
                    room.home, "/cluster/v1/rooms/leave",
                    {"call_id": op.call_id, "room_id": op.room_id})
            except PeerUnavailable as e:
                log.warning("conference %s: leave of %s at home %s: %s", room.name,
                            op.call_id, room.home, e)
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
                gone = [p.call_id for p in room.participants.values() if p.worker == worker]
                for call_id in gone:
                    self._remove(room, call_id, "worker_lost", notify_worker=False)
                await self._reconcile(room)
            if room.home is not None and self.cluster is not None:
                for call_id in gone:  # the home takes them out of the room too
                    with contextlib.suppress(PeerUnavailable):
                        await self.cluster.post(room.home, "/cluster/v1/rooms/leave",
                                                {"call_id": call_id, "room_id": room.id})

    async def node_lost(self, node: str) -> None:
        """A peer node is dead: its participants drop out of the rooms homed here (their finals
        are its business); the parts here of rooms homed there end for their members."""
        v = self._virtual.get(node)
        for room in [r for r in list(self.rooms.values()) if v is not None and r.home is None
                     and (v in r.workers or v in r.synced)]:
            async with room.lock:
                for p in [p for p in room.participants.values() if p.worker == v]:
                    self._remove(room, p.call_id, "node_lost")
                # the node is told too, best effort: one that only looked dead (a partition,
                # a stalled loop) ends its part cleanly instead of mixing a room of its own
                await self._reconcile(room)
                room.synced.discard(v)
                room.addrs = {k: a for k, a in room.addrs.items() if v not in k}
        for room in [r for r in list(self.rooms.values()) if r.home == node]:
            async with room.lock:
                log.warning("conference %s/%s: home node %s lost: the room ends here",
                            room.workspace_id, room.name, node)
                self._end(room, "ended")
                await self._reconcile(room)

    async def apply_part(self, home: str, part: RoomPart) -> dict[str, Any]:
        """The home's sync of this node's part of a room (POST /cluster/v1/rooms/part)."""
        room = self._by_id.get(part.room_id)
        if room is None:
            if part.ended or not part.members:
                return {"links": []}
            room = Room(part.workspace_id, part.name, id=part.room_id, home=home,
                        home_node=home)
            old = self.rooms.get(room.key)
            if old is not None and old.home is None and not old.ended:
                log.warning("conference %s: homed here and at %s", part.name, home)
            else:
                self.rooms[room.key] = room
            self._by_id[room.id] = room
        async with room.lock:
            room.started = part.started
            listed = {m.call_id: m for m in part.members}
            for call_id in [c for c in room.participants if c not in listed]:
                p = room.participants.pop(call_id)
                room.removed.setdefault(p.worker, {})[call_id] = part.removed.get(
                    call_id, "ended" if part.ended else "left")
            for m in part.members:
                p_ = room.participants.get(m.call_id)
                if p_ is None:
                    worker = self._pending.get(m.call_id)
                    if worker is None:
                        log.warning("conference %s: %s is not a call of this node", part.name,
                                    m.call_id)
                        continue
                    p_ = room.participants[m.call_id] = Participant(
                        m.call_id, worker, time.time(), node=self.node_id)
                p_.muted, p_.hold = m.muted, m.hold
            room.notices += part.notices
            room.beep = room.beep or part.beep
            for link in part.links:
                if link.key not in room.ext_ids:
                    room.ext_ids[link.key] = -(len(room.ext_ids) + 1)
            room.ext = {room.ext_ids[link.key]: link.key for link in part.links}
            room.ext_addr = {room.ext_ids[link.key]: (link.host, link.port)
                             for link in part.links if link.host and link.port}
            if (part.ended or not room.participants) and not room.ended:
                room.ended = True
                self._forget(room)
            await self._reconcile(room)
            hub = room.hub
            return {"links": [[key, *room.addrs[(hub, e)]] for e, key in room.ext.items()
                              if hub is not None and (hub, e) in room.addrs]}

    def call_ended(self, call_id: str) -> None:
        """A call is over on its worker: out of its room, should its verb not have said so."""
        room = self.room_of(call_id)
        if room is None:
            return
        task = asyncio.create_task(self._leave_ended(room, call_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _leave_ended(self, room: Room, call_id: str) -> None:
        if room.home is not None:
            await self.on_leave(-1, RoomLeave(call_id=call_id, room_id=room.id))
            return
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
            # a worker of this node when there is one (the design's home hub)
            ps = [p for p in room.participants.values() if p.worker >= 0]
            ps = ps or list(room.participants.values())
            first = min(ps, key=lambda p: p.joined_at, default=None)
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
        before = {w: {q: room.addr_of(q, w) for q in room.peers(w)} for w in targets}
        await asyncio.gather(*(
            self._sync(room, w, notices=notices, beep=beep, removed=removed.get(w, {}))
            for w in targets
        ))
        # second round: the ends that did not know their peer's (new) address now do
        again = set()
        for w in room.workers:
            now = {q: room.addr_of(q, w) for q in room.peers(w)}
            if all(now.values()) and now != before.get(w):
                again.add(w)
        if again:
            await asyncio.gather(*(self._sync(room, w) for w in again))
        if room.ended and not room.synced:
            self._by_id.pop(room.id, None)

    async def _sync(self, room: Room, w: int, *, notices: list[RoomNoticeSpec] | None = None,
                    beep: bool = False, removed: dict[str, str] | None = None) -> None:
        if w < 0 and room.home is None:
            await self._sync_part(room, w, notices=notices, beep=beep, removed=removed)
            return
        members = [RoomMemberState(call_id=p.call_id, muted=p.muted, hold=p.hold)
                   for p in room.participants.values() if p.worker == w]
        links = []
        for q in sorted(room.peers(w)):
            addr = room.addr_of(q, w)
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

    # -- node parts (cluster) -------------------------------------------------------------------
    def _key_of(self, q: int) -> str:
        return f"{self.node_id}:{q}" if q >= 0 else self._node_of[q]

    def _peer_of(self, key: str) -> int | None:
        mine, _, w = key.partition(":")
        if mine == self.node_id and w.isdigit():
            return int(w)
        return self._virtual.get(key)

    async def _sync_part(self, room: Room, v: int, *, notices: list[RoomNoticeSpec] | None,
                         beep: bool, removed: dict[str, str] | None) -> None:
        """A node's part of a room homed here: the RoomPart POSTed to that node."""
        assert self.cluster is not None
        node = self._node_of[v]
        members = [RoomMemberState(call_id=p.call_id, muted=p.muted, hold=p.hold)
                   for p in room.participants.values() if p.worker == v]
        links = []
        for q in sorted(room.peers(v)):
            addr = room.addrs.get((q, v))
            links.append(RoomPartLink(key=self._key_of(q), host=addr[0] if addr else None,
                                      port=addr[1] if addr else None))
        ended = room.ended or not members
        part = RoomPart(
            room_id=room.id, workspace_id=room.workspace_id, name=room.name,
            started=room.started, ended=ended, members=members, links=links,
            removed=removed or {}, notices=notices or [], beep=beep,
        )
        try:
            reply = await self.cluster.post(node, "/cluster/v1/rooms/part",
                                            {"home": self.node_id, "part": part.model_dump()})
        except PeerUnavailable as e:  # a dead node: node_lost cleans up after it
            log.warning("conference %s: sync of node %s failed: %s", room.name, node, e)
            return
        if ended:
            room.synced.discard(v)
        else:
            room.synced.add(v)
        for key, host, port in reply.get("links", []):
            peer = self._peer_of(str(key))
            if peer is not None and peer in room.peers(v):
                room.addrs[(v, peer)] = (str(host), int(port))
