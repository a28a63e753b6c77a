"""A supervisor on a dial bridge, on the bridge's home worker: the supervisor's leg (placed
like a dial leg, a call of its own with the bridge's caller as parent) and who hears whom by
mode, as edges on the bridge's MixGraph:

  listen    caller -> supervisor, agent -> supervisor
  whisper   the same, and supervisor -> agent (the customer does not hear it)
  barge     the same, and supervisor -> caller (everyone hears everyone)

"agent" is the dialled party that answered; "caller" the bridge's own call (the customer).
`announce` plays a short beep to the agent (or to both) when the supervisor joins and on every
mode change. Progress goes to the supervisor's registry as `SupervisionUpdate` asks, in order.
The ops (start, mode, stop) are registered here for the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from dsl.context import DialTarget
from gateway.control.errors import NOT_FOUND, OpRefused
from gateway.control.supervise_mode import SuperviseMode
from gateway.control.supervise_start import SuperviseStart
from gateway.control.supervise_stop import SuperviseStop
from gateway.control.supervision_update import SupervisionUpdate
from gateway.events.envelope import uuid7
from gateway.supervision.legs import NOT_BRIDGED_OP
from gateway.supervision.request import Announce, Mode
from gateway.workers.commands import handles
from gateway.workers.ipc import ChannelClosed
from media.mixgraph import Edge
from media.tones import Tone, beep

if TYPE_CHECKING:
    from gateway.dial.home import LegHandle, _Bridge
    from gateway.workers.worker import Worker

log = logging.getLogger(__name__)

ANNOUNCE = "announce"
ANNOUNCE_S = 0.6  # the beep's 200 ms and the bridge's queued ops around it
ASK_TIMEOUT_S = 5.0
# what the supervisor's leg ending says, by its final status (else the leg's own reason)
_ENDED = {"busy": "busy", "no_answer": "no_answer", "canceled": "canceled"}


class SupervisorTap:
    def __init__(self, bridge: _Bridge, op: SuperviseStart, leg: LegHandle) -> None:
        self.bridge = bridge
        self.worker = bridge.worker
        self.supervision_id = op.supervision_id
        self.call_id = op.call_id
        self.mode: Mode = op.mode
        self.announce: Announce = op.announce
        self.leg = leg
        self.stopped = False
        self.beep: Tone | None = None
        self._beep_off: asyncio.TimerHandle | None = None
        self._told = ""  # the last state reported
        self._reports: asyncio.Queue[SupervisionUpdate | None] = asyncio.Queue()
        self._sender = asyncio.ensure_future(self._send())

    # -- who hears whom ----------------------------------------------------------------------
    def edges(self, caller: str, agent: str | None, sup: str | None) -> dict[Edge, float]:
        if sup is None or agent is None or self.stopped:
            return {}
        out: dict[Edge, float] = {(caller, sup): 1.0, (agent, sup): 1.0}
        if self.mode in ("whisper", "barge"):
            out[(sup, agent)] = 1.0
        if self.mode == "barge":
            out[(sup, caller)] = 1.0
        if self.beep is not None:
            if self.announce in ("agent", "both"):
                out[(ANNOUNCE, agent)] = 1.0
            if self.announce == "both":
                out[(ANNOUNCE, caller)] = 1.0
        return out

    def set_mode(self, mode: Mode) -> None:
        if mode != self.mode:
            self.mode = mode
            self._announce()
            self.bridge.changed.set()

    def _announce(self) -> None:
        if self.announce == "none" or self.stopped:
            return
        if self.beep is None:
            self.beep = beep(self.worker.settings.media.clock_rate)
            self.bridge.graph.add(ANNOUNCE, self.beep.audio_media)
        else:
            self.beep.play()  # again, from its start
        if self._beep_off is not None:
            self._beep_off.cancel()
        self._beep_off = asyncio.get_running_loop().call_later(ANNOUNCE_S, self._beep_done)

    def _beep_done(self) -> None:
        tone, self.beep = self.beep, None
        if tone is None:
            return
        self.bridge.graph.remove(ANNOUNCE)
        self.bridge.changed.set()
        # after its queued stopTransmits have run (Tone.close drops the generator)
        asyncio.get_running_loop().call_later(1.0, tone.close)

    # -- progress ----------------------------------------------------------------------------
    def sync(self) -> None:
        """Called on every change of the bridge: report the leg's progress once per state."""
        leg = self.leg
        if leg.ended:
            status = leg.status or "failed"
            if leg.reason == "worker_lost":  # the worker holding the supervisor's leg died
                reason = "worker_lost"
            elif leg.answered_at is not None:
                reason = "supervisor_hangup"
            else:
                reason = _ENDED.get(status, leg.reason or status)
            self.close(reason)
        elif leg.state == "answered" and self._told != "connected":
            self._tell("connected", at=leg.answered_at or time.time())
            self._announce()
        elif leg.state in ("ringing", "early") and self._told == "":
            self._tell("ringing")

    def close(self, reason: str) -> None:
        """Over: the leg is ended (if it is not already) and the registry told, once."""
        if self.stopped:
            return
        self.stopped = True
        if self.bridge.tap is self:
            self.bridge.tap = None
        self.bridge.end_leg(self.leg, "supervision_ended" if reason == "api" else "bridge_ended")
        if self._beep_off is not None:
            self._beep_off.cancel()
        self._beep_done()
        self._tell("ended", reason=reason)
        self._reports.put_nowait(None)

    def _tell(self, state: str, **kw: Any) -> None:
        self._told = state
        self._reports.put_nowait(SupervisionUpdate(
            supervision_id=self.supervision_id, call_id=self.call_id, state=state,  # type: ignore[arg-type]
            **kw,
        ))

    async def _send(self) -> None:
        while (msg := await self._reports.get()) is not None:
            try:
                reply = await self.worker.supervisor.request(msg, ASK_TIMEOUT_S)
            except (ChannelClosed, TimeoutError) as e:
                log.warning("supervision %s: %s not delivered: %r", self.supervision_id,
                            msg.state, e)
                continue
            if not reply.ok:
                log.info("supervision %s: %s: %s", self.supervision_id, msg.state, reply.message)


def _bridge(worker: Worker, call_id: str) -> _Bridge:
    bridge = worker.dial.bridges.get(call_id)
    if bridge is None or bridge.closing:
        raise OpRefused(NOT_BRIDGED_OP, f"call {call_id} has no dial bridge on this worker")
    return bridge


def _tap(worker: Worker, call_id: str, supervision_id: str) -> SupervisorTap:
    tap = _bridge(worker, call_id).tap
    if tap is None or tap.supervision_id != supervision_id:
        raise OpRefused(NOT_FOUND, f"no supervision {supervision_id} on call {call_id}")
    return tap


@handles(SuperviseStart)
async def _start(worker: Worker, op: SuperviseStart) -> dict[str, Any]:
    bridge = _bridge(worker, op.call_id)
    winner = bridge.winner
    if winner is None or winner.state != "answered":
        raise OpRefused(NOT_BRIDGED_OP,
                        f"call {op.call_id} is not bridged yet (its dial has not been answered)")
    if bridge.tap is not None:
        raise OpRefused("supervised", f"call {op.call_id} already has a supervisor")
    from gateway.dial.home import LegHandle

    leg = LegHandle(uuid7(), DialTarget(op.kind, op.target), bridge.changed)
    bridge.tap = SupervisorTap(bridge, op, leg)
    bridge.place_extra(leg, op.timeout_s)
    log.info("call %s: supervision %s (%s) by leg %s", op.call_id, op.supervision_id, op.mode,
             leg.call_id)
    return {"leg_id": leg.call_id}


@handles(SuperviseMode)
async def _mode(worker: Worker, op: SuperviseMode) -> dict[str, Any]:
    _tap(worker, op.call_id, op.supervision_id).set_mode(op.mode)
    return {"mode": op.mode}


@handles(SuperviseStop)
async def _stop(worker: Worker, op: SuperviseStop) -> dict[str, Any]:
    with contextlib.suppress(OpRefused):
        _tap(worker, op.call_id, op.supervision_id).close("api")
    return {}
