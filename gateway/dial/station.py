"""A worker's part in dials: the legs running here (`legs`) and the legs of the bridges homed
here (`homes`, by leg call_id), and the ops that reach them (registered with `handles`):
`StartLeg` starts a leg here, `LegProgress` updates a bridge homed here, `EndLeg` ends a leg
running here. Progress and ends between two workers go through the supervisor
(gateway/dial/placement.py); within one worker they stay in process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gateway.control.dial_end import EndLeg, EndReason
from gateway.control.dial_progress import LegProgress
from gateway.control.dial_start import StartLeg
from gateway.control.errors import CALL_EXISTS, NO_SLOT, NOT_FOUND, OpRefused
from gateway.workers.commands import handles
from gateway.workers.ipc import ChannelClosed
from media.link import MediaLink, tune_gil

if TYPE_CHECKING:
    from gateway.dial.home import CallDialer, LegHandle, _Bridge
    from gateway.dial.leg import DialLeg
    from gateway.session import CallSession
    from gateway.workers.worker import Worker

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 5.0


class DialStation:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.legs: dict[str, DialLeg] = {}
        self.homes: dict[str, LegHandle] = {}
        self.bridges: dict[str, _Bridge] = {}  # running bridges homed here, by caller call_id
        self._gil_tuned = False

    def link(self) -> MediaLink:
        """A media link end (the first one makes this process hand the GIL over sooner: the
        links' frame callbacks wait for it on the clock thread, media.link.tune_gil)."""
        if not self._gil_tuned:
            self._gil_tuned = True
            tune_gil()
        return MediaLink(self.worker.settings.media.clock_rate)

    def dialer(self, session: CallSession) -> CallDialer:
        from gateway.dial.home import CallDialer

        return CallDialer(self, session)

    async def report(self, msg: LegProgress, home: int) -> None:
        """A leg's progress to its bridge: here, or through the supervisor."""
        if home == self.worker.index:
            if not self.progress(msg):
                self._orphaned(msg)
            return
        try:
            reply = await self.worker.supervisor.request(msg, ASK_TIMEOUT_S)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("dial leg %s: progress %s not delivered: %r", msg.call_id, msg.state, e)
            return
        if not reply.ok:
            log.info("dial leg %s: progress %s: %s", msg.call_id, msg.state, reply.message)
            if reply.code == NOT_FOUND:
                self._orphaned(msg)

    def progress(self, msg: LegProgress) -> bool:
        """To the bridge waiting for this leg; False when none does (any more)."""
        handle = self.homes.get(msg.call_id)
        if handle is None:
            return False
        handle.update(msg)
        return True

    def _orphaned(self, msg: LegProgress) -> None:
        """No bridge wants this leg (its home gave up placing it, ended, or died before the
        leg was known): end it rather than leave the callee ringing, or up, unbridged."""
        leg = self.legs.get(msg.call_id)
        if leg is not None and msg.state != "ended":
            log.warning("dial leg %s: no bridge waits for it; ending it", msg.call_id)
            leg.end("parent_lost")

    def end(self, call_id: str, worker: int, reason: EndReason) -> None:
        """End a leg wherever it runs (nothing waits for it: its progress says when)."""
        if worker == self.worker.index:
            leg = self.legs.get(call_id)
            if leg is not None:
                leg.end(reason)
            return
        self.worker._spawn(self._ask_end(EndLeg(call_id=call_id, reason=reason)))

    async def _ask_end(self, op: EndLeg) -> None:
        try:
            reply = await self.worker.supervisor.request(op, ASK_TIMEOUT_S)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("dial leg %s: end not delivered: %r", op.call_id, e)
            return
        if not reply.ok:
            log.info("dial leg %s: end: %s", op.call_id, reply.message)


@handles(StartLeg)
async def _start_leg(worker: Worker, op: StartLeg) -> dict[str, Any]:
    from gateway.dial.leg import DialLeg

    call_id = str(op.leg.get("call_id"))
    if call_id in worker.calls:  # a repeated request: never dial twice
        raise OpRefused(CALL_EXISTS, f"call {call_id} is already here")
    if worker.draining or worker.stopping.is_set():
        raise OpRefused(NO_SLOT, f"worker {worker.index} is draining")
    return await DialLeg(worker, op).start()


@handles(LegProgress)
async def _leg_progress(worker: Worker, op: LegProgress) -> dict[str, Any]:
    if not worker.dial.progress(op) and op.state != "ended":
        raise OpRefused(NOT_FOUND, f"no bridge on worker {worker.index} waits for {op.call_id}")
    return {}


@handles(EndLeg)
async def _end_leg(worker: Worker, op: EndLeg) -> dict[str, Any]:
    leg = worker.dial.legs.get(op.call_id)
    if leg is None:
        raise OpRefused(NOT_FOUND, f"no dial leg {op.call_id} on worker {worker.index}")
    leg.end(op.reason)
    return {}
