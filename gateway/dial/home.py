"""The bridge's home: the caller's worker runs `dial` (dsl's `Dialer`) for its call.

Each target is a child leg placed by the supervisor (`PlaceLeg`): on this worker when it has a
free slot (the leg's call is then a port of this bridge), else on another worker, joined by a
media link whose home end is made here first (its address goes with the ask). Who hears whom
is one edge set on this bridge's MixGraph, recomputed on every change:

  ringing      ringback -> caller (or the first leg's early media -> caller, on 183)
  answered     caller <-> winner
  recording    caller -> recorder, and winner (or early media / ringback, from-ringing) -> it

The first leg to answer wins, the others are ended (`lost_race`: CANCEL, final `canceled`).
Either side hanging up ends the bridge: the callee's BYE returns a DialResult (the caller's
document goes on); the caller's hangup ends every leg (`parent_hangup`) and raises CallEnded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pjsua2 as pj

from dsl.context import CallEnded, DialRequest, DialResult, DialStatus, DialTarget
from gateway.calls.identity import CallIdentity, duration_seconds
from gateway.control.dial_end import EndReason
from gateway.control.dial_place import PlaceLeg
from gateway.control.dial_progress import LegProgress
from gateway.dial.graph import KEEP_S, BridgeGraph
from gateway.events.envelope import uuid7
from gateway.workers.ipc import ChannelClosed
from media.call import CallGone, _wav_duration, _wav_finalised
from media.link import MediaLink
from media.mixgraph import Edge, MixGraphError, bridge_edges
from media.tones import Tone, ringback

if TYPE_CHECKING:
    from gateway.dial.station import DialStation
    from gateway.session import CallSession
    from gateway.supervision.tap import SupervisorTap

log = logging.getLogger(__name__)

CALLER, RINGBACK, RECORDER = "caller", "ringback", "recorder"
PLACE_TIMEOUT_S = 10.0

_STATUS: dict[str, DialStatus] = {
    "completed": "completed",
    "busy": "busy",
    "no_answer": "no-answer",
    "canceled": "canceled",
}


class LegHandle:
    """What the home knows of one child leg (fed by LegProgress)."""

    def __init__(self, call_id: str, target: DialTarget, changed: asyncio.Event) -> None:
        self.call_id = call_id
        self.target = target
        self.changed = changed
        self.worker: int | None = None  # where the supervisor placed it
        self.link: MediaLink | None = None  # the home's link end (a leg on another worker)
        self.state = "placing"
        self.status: str | None = None
        self.reason: str | None = None
        self.sip_code: int | None = None
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.end_asked: EndReason | None = None

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def update(self, p: LegProgress) -> None:
        if self.ended:
            return
        if p.state == "ringing" and self.state in ("placing", "ringing"):
            self.state = "ringing"
        elif p.state == "early" and self.state in ("placing", "ringing"):
            self.state = "early"
        elif p.state == "answered":
            self.state = "answered"
            self.answered_at = p.answered_at
        elif p.state == "ended":
            self.state = "ended"
            self.status, self.reason, self.sip_code = p.status, p.reason, p.sip_code
            self.answered_at = p.answered_at or self.answered_at
            self.ended_at = p.ended_at
        self.changed.set()

    def failed(self, reason: str) -> None:
        self.state, self.status, self.reason = "ended", "failed", reason
        self.changed.set()


class CallDialer:
    """`ctx.dialer` of one call (dsl.context.Dialer)."""

    def __init__(self, station: DialStation, session: CallSession) -> None:
        self.station = station
        self.session = session

    async def dial(self, request: DialRequest) -> DialResult:
        bridge = _Bridge(self.station, self.session, request)
        return await bridge.run()


class _Bridge:
    def __init__(self, station: DialStation, session: CallSession, req: DialRequest) -> None:
        self.station = station
        self.worker = station.worker
        self.session = session
        self.req = req
        self.caller = session.call
        self.graph = BridgeGraph()
        self.changed = asyncio.Event()
        self.legs: list[LegHandle] = []
        self.winner: LegHandle | None = None
        self.tone: Tone | None = None
        self.recorder: pj.AudioMediaRecorder | None = None
        self.recording: tuple[str, Path, Path] | None = None  # id, partial file, final file
        self._limit: asyncio.TimerHandle | None = None
        self._media_hooked: set[str] = set()
        # PlaceLeg asks in flight: never cancelled with the dial (a leg placed after the dial
        # stopped waiting is ended once its worker is known, see _close)
        self._placing: set[asyncio.Task[None]] = set()
        self.tap: SupervisorTap | None = None  # a supervisor on this bridge (gateway/supervision)
        self.extra_legs: list[LegHandle] = []  # legs not in the race: the supervisor's
        self.closing = False

    @property
    def index(self) -> int:
        return self.worker.index

    async def run(self) -> DialResult:
        caller = self.caller

        def wake(_end: Any) -> None:
            self.graph.forget(CALLER)  # PJSIP dropped its port (and may reuse the slot)
            self.changed.set()

        caller.on_end.append(wake)
        self.station.bridges[self.session.call_id] = self
        try:
            try:
                self.graph.add(CALLER, caller.audio_media())
            except CallGone:
                raise CallEnded() from None
            self.tone = ringback(self.worker.settings.media.clock_rate)
            self.graph.add(RINGBACK, self.tone.audio_media)
            if self.req.record == "record-from-ringing":
                self._start_recording()
            groups = [[t] for t in self.req.targets] if self.req.sequential \
                else [list(self.req.targets)]
            result = DialResult("failed")
            for group in groups:
                result = await self._attempt(group)
                if result.status == "completed":
                    break
            return result
        finally:
            with contextlib.suppress(ValueError):
                caller.on_end.remove(wake)
            await self._close()
            if self.station.bridges.get(self.session.call_id) is self:
                del self.station.bridges[self.session.call_id]

    # -- one round of ringing (all of `targets` at once) ------------------------------------
    async def _attempt(self, targets: list[DialTarget]) -> DialResult:
        legs = [LegHandle(uuid7(), t, self.changed) for t in targets]
        self.legs += legs
        # Not waited for: a placement may wait for a trunk's rate limit while another leg
        # already rings, and the caller may hang up meanwhile.
        self._placing |= {asyncio.ensure_future(self._place(leg)) for leg in legs}
        while True:
            if self.caller.ended:
                for leg in legs:
                    self._end(leg, "parent_hangup")
                raise CallEnded()
            if self.winner is None:
                for leg in legs:
                    if leg.state == "answered" or (leg.ended and leg.answered_at is not None
                                                   and leg.status == "completed"):
                        self._won(leg, legs)
                        break
            if self.winner is not None and self.winner.ended:
                w = self.winner
                return DialResult(
                    _STATUS.get(w.status or "", "failed"),
                    w.call_id,
                    duration_seconds(w.answered_at, w.ended_at or time.time())
                    if w.answered_at is not None else 0,
                    200 if w.answered_at is not None else w.sip_code,
                )
            if self.winner is None and all(leg.ended for leg in legs):
                return _unanswered(legs)
            if self.tap is not None:
                self.tap.sync()
            self._apply()
            self.changed.clear()
            await self.changed.wait()

    def _won(self, leg: LegHandle, legs: list[LegHandle]) -> None:
        self.winner = leg
        log.info("call %s: dial answered by %s", self.session.call_id, leg.call_id)
        for other in legs:
            if other is not leg:
                self._end(other, "lost_race")
        if self.req.record == "record-from-answer":
            self._start_recording()
        if self.req.time_limit_s:
            self._limit = asyncio.get_running_loop().call_later(
                self.req.time_limit_s, self._end, leg, "time_limit")

    def place_extra(self, leg: LegHandle, timeout_s: float) -> None:
        """Place a leg outside the dial's race (a supervisor's): it joins this bridge by the
        edges its owner adds, and ends with the bridge."""
        self.extra_legs.append(leg)
        self._placing.add(asyncio.ensure_future(self._place(leg, timeout_s)))

    def end_leg(self, leg: LegHandle, reason: EndReason) -> None:
        self._end(leg, reason)

    async def _place(self, leg: LegHandle, timeout_s: float | None = None) -> None:
        ident = self.session.identity
        caller_id = self.req.caller_id or ident.local_e164
        child = CallIdentity(
            call_id=leg.call_id,
            direction="outbound",
            from_=caller_id,
            to=f"client:{leg.target.value}" if leg.target.kind == "client" else leg.target.value,
            number_id=ident.number_id,
            workspace_id=ident.workspace_id,
            created_at=time.time(),
            parent_call_id=ident.call_id,
            session_id=ident.session_id,
            client=leg.target.value if leg.target.kind == "client" else None,
        )
        # Made first, so a leg placed elsewhere can connect to it at once; dropped when the
        # leg lands here.
        link = self.station.link()
        leg.link = link
        self.station.homes[leg.call_id] = leg  # before asking: progress may beat the reply
        op = PlaceLeg(
            leg=child.to_wire(), kind=leg.target.kind, target=leg.target.value,
            caller_id=caller_id, timeout_s=timeout_s or self.req.timeout_s,
            events=self.session.writer.dest, home_link=link.local_addr,
        )
        try:
            reply = await self.worker.supervisor.request(op, PLACE_TIMEOUT_S)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("call %s: dial leg %s not placed: %r", ident.call_id, leg.call_id, e)
            self._drop_link(leg)
            leg.failed("placement_failed")
            return
        if not reply.ok:
            log.warning("call %s: dial leg to %s not placed: %s %s", ident.call_id,
                        leg.target.value, reply.code, reply.message)
            self._drop_link(leg)
            leg.failed(reply.code or "placement_failed")
            return
        leg.worker = int(reply.result["worker"])
        peer = reply.result.get("link")
        if leg.worker == self.index or peer is None:
            self._drop_link(leg)
        else:
            link.connect((str(peer[0]), int(peer[1])))
            self.graph.add(leg.call_id, link.audio_media)
        log.info("call %s: dial leg %s to %s on worker %d%s", ident.call_id, leg.call_id,
                 leg.target.value, leg.worker, "" if leg.link is None else " (media link)")
        if leg.end_asked is not None or self.caller.ended:  # ended while it was being placed
            self.station.end(leg.call_id, leg.worker, leg.end_asked or "parent_hangup")
        self.changed.set()

    def _drop_link(self, leg: LegHandle) -> None:
        if leg.link is not None:
            leg.link.close()
            leg.link = None

    def _end(self, leg: LegHandle, reason: EndReason) -> None:
        if leg.ended or leg.end_asked is not None:
            return
        leg.end_asked = reason
        if leg.worker is not None:
            self.station.end(leg.call_id, leg.worker, reason)

    # -- who hears whom ---------------------------------------------------------------------
    def _port(self, leg: LegHandle) -> str | None:
        """The leg's key in the graph once it has media here (its link, or its own call)."""
        if leg.ended:
            return None
        if leg.call_id in self.graph:
            return leg.call_id
        if leg.worker != self.index or leg.state not in ("early", "answered"):
            return None
        local = self.station.legs.get(leg.call_id)
        if local is None or local.call is None:
            return None
        call = local.call
        try:
            self.graph.add(leg.call_id, call.audio_media())
        except CallGone:
            return None
        if leg.call_id not in self._media_hooked:  # a re-INVITE moves the port's edges
            self._media_hooked.add(leg.call_id)
            key = leg.call_id
            call.on_media.append(lambda am: self._moved(key, am))
            call.on_end.append(lambda _end: self.graph.forget(key))
        return leg.call_id

    def _moved(self, key: str, am: Any) -> None:
        if key in self.graph:
            with contextlib.suppress(MixGraphError):
                self.graph.add(key, am)

    def _apply(self) -> None:
        edges: dict[Edge, float] = {}
        heard: str | None = None  # what the caller hears from the far side
        if self.winner is not None:
            key = self._port(self.winner)
            if key is not None:
                edges.update(bridge_edges(CALLER, key))
                heard = key
        else:
            early = next((k for leg in self.legs if leg.state == "early"
                          and (k := self._port(leg)) is not None), None)
            heard = early or RINGBACK
            edges[(heard, CALLER)] = 1.0
        if self.recorder is not None:
            edges[(CALLER, RECORDER)] = 1.0
            if heard is not None:
                edges[(heard, RECORDER)] = 1.0
        if self.tap is not None and self.winner is not None:
            sup = self._port(self.tap.leg) if self.tap.leg.state == "answered" else None
            edges.update(self.tap.edges(CALLER, heard, sup))
        edges = {e: lv for e, lv in edges.items() if e[0] in self.graph and e[1] in self.graph}
        try:
            self.graph.set_edges(edges)
        except MixGraphError as e:  # a leg whose media just went: its end is on its way
            log.debug("call %s: dial edges: %s", self.session.call_id, e)

    # -- recording --------------------------------------------------------------------------
    def _start_recording(self) -> None:
        if self.recorder is not None:
            return
        rid = uuid.uuid4().hex
        final = self.session.recordings_dir / f"{rid}.wav"
        part = final.with_name(f".{rid}.part.wav")
        rec = pj.AudioMediaRecorder()
        try:
            rec.createRecorder(str(part))
        except pj.Error as e:
            log.warning("call %s: dial recording not started: %s", self.session.call_id, e.info())
            return
        self.recorder, self.recording = rec, (rid, part, final)
        self.graph.add(RECORDER, rec)
        self.session.writer.recording_state(rid, "in_progress")

    async def _finish_recording(self) -> None:
        if self.recorder is None or self.recording is None:
            return
        rid, part, final = self.recording
        self.graph.remove(RECORDER)
        # Its stopTransmits are queued to the clock thread: let them run before the recorder
        # goes (deleting it is what writes the WAV header, as in media.call's record).
        await asyncio.sleep(0.1)
        self.recorder = None
        await _wav_finalised(part, timeout=3.0)
        duration = _wav_duration(part)
        await asyncio.to_thread(part.replace, final)
        await self.session.writer.recording_ready(rid, final, duration, "wav")

    # -- the end ----------------------------------------------------------------------------
    async def _close(self) -> None:
        self.closing = True
        if self.tap is not None:
            self.tap.close("bridge_ended")
        if self._limit is not None:
            self._limit.cancel()
        if self._placing:
            await asyncio.wait(self._placing, timeout=PLACE_TIMEOUT_S + 1)
        # An API hangup of the caller stops the dial before its BYE is out: the caller's too.
        gone = self.caller.ended or self.session.ended_by_api
        reason: EndReason = "parent_hangup" if gone else "bridge_ended"
        for leg in self.legs + self.extra_legs:
            self._end(leg, reason)
            self.station.homes.pop(leg.call_id, None)
        try:
            await self._finish_recording()
        except Exception:
            log.exception("call %s: dial recording failed", self.session.call_id)
        self.graph.clear()
        if self.tone is not None:
            # after its queued stopTransmits have run (Tone.close drops the generator)
            asyncio.get_running_loop().call_later(KEEP_S, self.tone.close)
        for leg in self.legs + self.extra_legs:
            self._drop_link(leg)


def _unanswered(legs: list[LegHandle]) -> DialResult:
    """Nobody answered: the most telling leg's status (no-answer, then busy, then failed)."""
    for want in ("no_answer", "busy", "failed", "canceled"):
        for leg in legs:
            if leg.status == want:
                return DialResult(_STATUS.get(want, "failed"), leg.call_id if leg.worker is not
                                  None else "", 0, leg.sip_code)
    leg = legs[0]
    return DialResult("failed", leg.call_id if leg.worker is not None else "", 0, leg.sip_code)
