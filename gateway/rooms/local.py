"""A worker's part of each conference room: its participants and links, mixed in its bridge.

The supervisor (gateway/rooms/registry.py) sends a `RoomSync` per change; `LocalRoom.apply`
makes the room's `MixGraph` match it:

* started: every port hears every other port except itself (`room_edges`: members by their
  flags, links always; on the hub a link's audio goes on to the other links, so the star is
  one room); muted members transmit to nobody; held members hear the hold tone only and are
  not heard;
* not started: nobody is mixed; members waiting without a waitUrl hear the hold tone;
* a beep tone to every local member who hears the room (each worker beeps its own members,
  so a beep never crosses a link);
* a recorder per recording participant (its whole-room mix: every local port and every link).

Each room has its own MixGraph (its ports are the room's alone: a call in a room is in no dial
bridge). The verb's side is `Seat` (dsl.context.RoomSeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsl.context import RoomEntry, RoomLeft, RoomNotice, RoomRefused
from gateway.control.errors import NOT_FOUND, OpRefused
from gateway.control.room_join import RoomJoin
from gateway.control.room_leave import RoomLeave
from gateway.control.room_sync import RoomSync
from gateway.workers.commands import handles
from media.mixgraph import Edge, Member, MixGraph, MixGraphError, room_edges

if TYPE_CHECKING:
    from gateway.workers.ipc import Requester
    from gateway.workers.worker import Worker
    from media.call import SipCall

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 10.0
HOLD_KEY, BEEP_KEY = "~hold", "~beep"
KEEP_S = 2.0  # a closed tone / recorder is kept referenced this long (queued bridge ops)


def _link_key(peer: int) -> str:
    return f"~link:{peer}"


def _rec_key(call_id: str) -> str:
    return f"~rec:{call_id}"


class Seat:
    """One call's place in a room (the verb's RoomSeat)."""

    def __init__(self, rooms: LocalRooms, call_id: str, call: SipCall, entry: RoomEntry) -> None:
        self.rooms = rooms
        self.call_id = call_id
        self.call = call
        self.entry = entry
        self.room_id = ""
        loop = asyncio.get_running_loop()
        self.started = asyncio.Event()
        self.left: asyncio.Future[str] = loop.create_future()
        self.notices: asyncio.Queue[RoomNotice] = asyncio.Queue()
        self.recorder: Any = None
        self.record_path: Path | None = None
        self.wait_tone = entry.wait_tone
        self._left_done = False

    def hold_tone_while_waiting(self) -> None:
        self.wait_tone = True
        room = self.rooms.rooms.get(self.room_id)
        if room is not None and self.call_id in room.members:
            room.remix()

    async def leave(self) -> RoomLeft:
        if self._left_done:
            return RoomLeft(0)
        self._left_done = True
        room = self.rooms.rooms.get(self.room_id)
        if room is not None:
            room.drop(self.call_id)
        recording = await self._finish_recording()
        count = 0
        if self.room_id:
            try:
                reply = await self.rooms.supervisor.request(
                    RoomLeave(call_id=self.call_id, room_id=self.room_id), ASK_TIMEOUT_S)
                count = int(reply.result.get("count", 0))
            except Exception as e:  # the supervisor is gone: so is the room
                log.warning("call %s: leaving room %s: %s", self.call_id, self.room_id, e)
        self.rooms.seats.pop(self.call_id, None)
        return RoomLeft(count, recording)

    def gone(self, why: str) -> None:
        if not self.left.done():
            self.left.set_result(why)

    async def _finish_recording(self) -> tuple[Path, float] | None:
        rec, self.recorder = self.recorder, None
        path = self.record_path
        if rec is None or path is None:
            return None
        from media.call import _wav_duration, _wav_finalised

        # its stopTransmits are queued to the clock thread: drop it only after they ran (the
        # port then leaves the bridge and the WAV header is written)
        await asyncio.sleep(0.1)
        del rec
        await _wav_finalised(path, timeout=3.0)
        return path, _wav_duration(path)


class LocalRoom:
    def __init__(self, rooms: LocalRooms, room_id: str, name: str) -> None:
        self.rooms = rooms
        self.id = room_id
        self.name = name
        self.graph = MixGraph()
        self.members: dict[str, tuple[Seat, bool, bool]] = {}  # call_id -> (seat, muted, hold)
        self.links: dict[int, Any] = {}  # peer worker -> MediaLink
        self.hold: Any = None  # media.tones.Tone
        self.beep: Any = None
        self.started = False

    # -- the supervisor's view ----------------------------------------------------------------
    def apply(self, op: RoomSync) -> list[list[Any]]:
        # members removed in this sync get its notices too, and so do the ones it adds
        told = [seat for seat, _, _ in self.members.values()]
        listed = {m.call_id: m for m in op.members}
        for call_id in [c for c in self.members if c not in listed]:
            seat = self.members[call_id][0]
            self.drop(call_id)
            seat.gone(op.removed.get(call_id, "ended" if op.ended else "kicked"))
        for call_id, why in op.removed.items():  # removed before its seat was known here
            seat_ = self.rooms.seats.get(call_id)
            if seat_ is not None and seat_.room_id == self.id and call_id not in listed:
                seat_.gone(why)
        for m in op.members:
            if m.call_id in self.members:
                seat = self.members[m.call_id][0]
            else:
                found = self.rooms.seats.get(m.call_id)
                if found is None or found._left_done:
                    log.warning("room %s: no seat for %s here", self.name, m.call_id)
                    continue
                seat = found
                seat.room_id = self.id
                try:
                    self.graph.add(m.call_id, seat.call.audio_media())
                except Exception as e:  # the call is gone: its leave is on its way
                    log.info("room %s: %s has no media: %s", self.name, m.call_id, e)
                    continue
                if seat.entry.record_to is not None:
                    self._start_recorder(seat)
            self.members[m.call_id] = (seat, m.muted, m.hold)
        told += [seat for seat, _, _ in self.members.values() if seat not in told]
        for seat in told:
            for n in op.notices:
                seat.notices.put_nowait(RoomNotice(n.event, n.call_id, n.count))
        self.started = op.started
        self._links(op)
        if op.beep and self.members:
            self._beep()
        self._mix()
        if op.started:
            for seat, _, _ in self.members.values():
                seat.started.set()
        return [[peer, *link.local_addr] for peer, link in self.links.items()]

    def _links(self, op: RoomSync) -> None:
        from media.link import MediaLink

        wanted = {spec.peer: spec for spec in op.links}
        for peer in [p for p in self.links if p not in wanted]:
            link = self.links.pop(peer)
            self.graph.remove(_link_key(peer))
            link.close()
        for peer, spec in wanted.items():
            link = self.links.get(peer)
            if link is None:
                self.rooms.hosting_links()
                link = MediaLink(self.rooms.clock_rate, self.rooms.link_host)
                self.links[peer] = link
                self.graph.add(_link_key(peer), link.audio_media)
            if spec.host is not None and spec.port is not None:
                addr = (spec.host, spec.port)
                if link.peer_addr != addr:
                    link.connect(addr)

    def _mix(self) -> None:
        edges: dict[Edge, float] = {}
        if self.started:
            members = {c: Member(speak=not muted and not hold, hear=not hold)
                       for c, (_, muted, hold) in self.members.items()}
            edges.update(room_edges(members, [_link_key(p) for p in self.links]))
        want_hold = [c for c, (seat, _, hold) in self.members.items()
                     if hold or (not self.started and seat.wait_tone)]
        if want_hold:
            if self.hold is None:
                from media.tones import hold_tone

                self.hold = hold_tone(self.rooms.clock_rate)
                self.graph.add(HOLD_KEY, self.hold.audio_media)
            edges.update({(HOLD_KEY, c): 1.0 for c in want_hold})
        if self.beep is not None:
            edges.update({(BEEP_KEY, c): 1.0 for c, (_, _, hold) in self.members.items()
                          if not hold})
        speakers = [c for c, (_, muted, hold) in self.members.items() if not muted and not hold]
        speakers += [_link_key(p) for p in self.links]
        for c, (seat, _, _) in self.members.items():
            if seat.recorder is not None and self.started:
                edges.update({(s, _rec_key(c)): 1.0 for s in speakers})
        try:
            self.graph.set_edges(edges)
        except MixGraphError as e:  # a call whose media just went: its leave follows
            log.info("room %s: %s", self.name, e)

    def remix(self) -> None:
        self._mix()

    def _beep(self) -> None:
        from media.tones import beep

        if self.beep is None:
            self.beep = beep(self.rooms.clock_rate)
            self.graph.add(BEEP_KEY, self.beep.audio_media)
        else:
            self.beep.play()

    def _start_recorder(self, seat: Seat) -> None:
        import pjsua2 as pj

        assert seat.entry.record_to is not None
        rec = pj.AudioMediaRecorder()
        try:
            rec.createRecorder(str(seat.entry.record_to))
        except pj.Error as e:  # e.g. the process's recorders are all in use: no recording
            log.error("room %s: cannot record for %s: %s", self.name, seat.call_id, e.info())
            return
        seat.recorder, seat.record_path = rec, seat.entry.record_to
        self.graph.add(_rec_key(seat.call_id), rec)

    # -- the verb's side --------------------------------------------------------------------------
    def drop(self, call_id: str) -> None:
        """The call is out of the local mix now (its leave is told to the supervisor after)."""
        if self.members.pop(call_id, None) is None:
            return
        self.graph.remove(call_id)
        self.graph.remove(_rec_key(call_id))
        self._mix()

    def close(self) -> None:
        for c in list(self.members):
            seat = self.members[c][0]
            self.drop(c)
            seat.gone("ended")
        for peer in list(self.links):
            self.graph.remove(_link_key(peer))
            self.links.pop(peer).close()
        for key, attr in ((HOLD_KEY, "hold"), (BEEP_KEY, "beep")):
            tone = getattr(self, attr)
            if tone is not None:
                self.graph.remove(key)
                # closed once its queued stopTransmits have run (close drops the generator)
                asyncio.get_running_loop().call_later(KEEP_S, tone.close)
                self.rooms.keep(tone)
                setattr(self, attr, None)
        self.graph.clear()


class LocalRooms:
    """The worker's rooms (the DSL's `Rooms`): joins ask the supervisor, syncs apply here."""

    def __init__(self, supervisor: Requester, calls: Callable[[str], tuple[SipCall, str] | None],
                 clock_rate: int, link_host: str = "127.0.0.1") -> None:
        self.supervisor = supervisor
        self._calls = calls  # call_id -> (its SipCall, its workspace_id)
        self.clock_rate = clock_rate
        self.link_host = link_host
        self.rooms: dict[str, LocalRoom] = {}
        self.seats: dict[str, Seat] = {}
        self._kept: list[Any] = []
        self._tuned = False

    async def join(self, call_id: str, entry: RoomEntry) -> Seat:
        found = self._calls(call_id)
        if found is None:
            raise RoomRefused("unavailable", f"call {call_id} is not on this worker")
        call, workspace_id = found
        seat = self.seats[call_id] = Seat(self, call_id, call, entry)
        op = RoomJoin(
            call_id=call_id, workspace_id=workspace_id, name=entry.name, muted=entry.muted,
            beep=entry.beep, start_on_enter=entry.start_on_enter, end_on_exit=entry.end_on_exit,
            max_participants=entry.max_participants, flags=list(entry.flags),
            record=entry.record_to is not None,
        )
        try:
            reply = await self.supervisor.request(op, ASK_TIMEOUT_S)
        except BaseException as e:
            self.seats.pop(call_id, None)
            if isinstance(e, Exception):
                raise RoomRefused("unavailable", f"the supervisor did not answer: {e}") from e
            raise
        if not reply.ok:
            self.seats.pop(call_id, None)
            raise RoomRefused(reply.code or "unavailable", reply.message or "")
        seat.room_id = str(reply.result["room_id"])
        if reply.result.get("started"):
            seat.started.set()
        return seat

    def apply(self, op: RoomSync) -> dict[str, Any]:
        room = self.rooms.get(op.room_id)
        if room is None:
            if op.ended and not op.removed:
                return {"links": []}
            room = self.rooms[op.room_id] = LocalRoom(self, op.room_id, op.name)
        links = room.apply(op)
        if op.ended:
            room.close()
            del self.rooms[op.room_id]
            links = []
        return {"links": links}

    def hosting_links(self) -> None:
        """This worker hosts media links from now on: each frame callback waits for the GIL,
        so a busy loop must hand it over sooner (media.link.tune_gil, measured there)."""
        if not self._tuned:
            from media.link import tune_gil

            tune_gil()
            self._tuned = True

    def keep(self, obj: Any) -> None:
        """Hold a closed pjsua2 object a while: the bridge may still use it on its clock."""
        self._kept.append(obj)
        asyncio.get_running_loop().call_later(KEEP_S, self._release, obj)

    def _release(self, obj: Any) -> None:
        with contextlib.suppress(ValueError):
            self._kept.remove(obj)

    def close_all(self) -> None:
        for room in list(self.rooms.values()):
            room.close()
        self.rooms.clear()


@handles(RoomSync)
async def _room_sync(worker: Worker, op: RoomSync) -> dict[str, Any]:
    rooms = getattr(worker, "rooms", None)
    if rooms is None:
        raise OpRefused(NOT_FOUND, "this worker has no rooms")
    result: dict[str, Any] = rooms.apply(op)
    return result
