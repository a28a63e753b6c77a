"""A dial's child leg on the worker the supervisor placed it on: a call of its own.

From `StartLeg` to its final event: the INVITE (trunk failover like an outbound call), ringing
bounded by the dial's `timeout` (then CANCEL: no_answer), its own `call.started` /
`call.answered` / one final (direction outbound, `parent_call_id`), tracked as a `LiveCall` so
API commands reach it. Its progress goes to the bridge's home (`DialStation.report`). On
another worker than the home, its media meets the home through a media link: this worker's
end is bridged both ways to the leg's call as soon as the call has media (early media too).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from gateway.calls.identity import CallIdentity
from gateway.calls.outbound import fails_over
from gateway.calls.outcome import CallFacts, EndedBy, Failure, Outcome, classify
from gateway.control.dial_end import EndReason
from gateway.control.dial_progress import LegProgress
from gateway.control.dial_start import LegTarget, StartLeg
from gateway.control.errors import NO_SLOT, OpRefused
from gateway.dial.graph import BridgeGraph
from gateway.workers.commands import LiveCall
from media.call import CallGone, CallSetupError, NoCallSlot, SipCall
from media.link import MediaLink
from media.mixgraph import MixGraphError, bridge_edges

if TYPE_CHECKING:
    import pjsua2 as pj

    from gateway.workers.worker import Worker

log = logging.getLogger(__name__)

LEG, LINK = "leg", "link"

_END_MESSAGES: dict[str, str] = {
    "parent_hangup": "the caller hung up before the dialled party answered",
    "lost_race": "another dialled number answered first",
    "bridge_ended": "the dial ended before this leg was answered",
    "time_limit": "the dial's time limit ended the call",
    "parent_lost": "the worker holding the caller exited",
    "supervision_ended": "the supervision was ended before the supervisor answered",
}


class DialLeg:
    def __init__(self, worker: Worker, op: StartLeg) -> None:
        self.worker = worker
        self.op = op
        self.identity = CallIdentity.from_wire(op.leg).with_(worker=worker.index)
        self.call_id = self.identity.call_id
        self.parent_call_id = self.identity.parent_call_id or ""
        self.writer = worker.writer(self.identity, op.events)
        self.live = LiveCall(self.identity, leg=self)
        self.call: SipCall | None = None
        self.trunk: str | None = None
        self.failure: Failure | None = None
        self.end_reason: EndReason | None = None
        self.ring_timeout = False
        self.outcome: Outcome | None = None
        self._targets = list(op.targets)
        self._early_told = False
        self._by_api = False  # ended by an API hangup (its final says api_hangup)
        # the worker-side media of a leg away from its home: this link end <-> the call
        self.link: MediaLink | None = None
        self.graph: BridgeGraph | None = None
        # progress to the home, in order (one sender: a later state never overtakes)
        self._outbox: asyncio.Queue[LegProgress | None] = asyncio.Queue()

    @property
    def local(self) -> bool:
        """The bridge is on this worker (media meets in its conference bridge)."""
        return self.op.home_worker == self.worker.index

    @property
    def status(self) -> str:
        return "in-progress" if self.call is not None and self.call.answered else "ringing"

    # -- start ------------------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        if not self._targets:
            raise OpRefused("no_trunk", "no target to place the leg through")
        if not self.local and self.op.home_link is None:
            raise OpRefused("invalid", "a leg away from its home needs the home's link")
        self.call = call = self._dial(self._targets.pop(0))
        station = self.worker.dial
        try:
            if not self.local:
                assert self.op.home_link is not None
                self.link = station.link()
                self.link.connect((self.op.home_link[0], self.op.home_link[1]))
                self.graph = BridgeGraph()
                self.graph.add(LINK, self.link.audio_media)
            station.legs[self.call_id] = self
            self.worker.track(self.live)
            self.writer.started()
        except BaseException:
            call.reject_now(500)
            station.legs.pop(self.call_id, None)
            self.worker.untrack(self.live, None, time.time())
            self._close_media()
            raise
        self._watch(call)
        self.worker._spawn(self.run())
        self.worker._spawn(self._send_progress())
        return {"link": list(self.link.local_addr) if self.link is not None else None}

    def _dial(self, target: LegTarget) -> SipCall:
        host = self.worker.from_host
        try:
            call = self.worker.endpoint.make_call(
                target.uri, trunk=target.trunk, from_uri=f"sip:{self.op.caller_id}@{host}",
                last_slot=True,
            )
        except NoCallSlot as e:
            raise OpRefused(NO_SLOT, f"worker {self.worker.index}: {e}") from e
        except CallSetupError as e:
            raise OpRefused("invite_failed", f"could not send the INVITE to {target.uri}: {e}") \
                from e
        self.trunk = target.trunk
        log.info("dial leg %s (of %s): INVITE %s%s", self.call_id, self.parent_call_id,
                 target.uri, f" via trunk {target.trunk}" if target.trunk else "")
        return call

    def _watch(self, call: SipCall) -> None:
        call.on_early.append(lambda code: self._report("ringing", sip_code=code))
        call.on_media.append(self._media)
        call.on_end.append(self._gone)

    def _gone(self, _end: Any) -> None:
        if self.graph is not None:
            self.graph.forget(LEG)  # PJSIP dropped the call's port (its slot may be reused)

    def _media(self, am: pj.AudioMedia) -> None:
        """The call has audio (183 early media, or the answer): bridge it to the link, and
        tell the home it may listen (early media replaces its ringback)."""
        if self.graph is not None and self.link is not None and not self.link.closed:
            try:
                self.graph.add(LEG, am)
                self.graph.set_edges(bridge_edges(LEG, LINK))
            except (MixGraphError, ValueError) as e:
                log.warning("dial leg %s: media link edges: %s", self.call_id, e)
        if self.call is not None and not self.call.answered and not self._early_told:
            self._early_told = True
            self._report("early")

    # -- commands ---------------------------------------------------------------------------
    def end(self, reason: EndReason) -> None:
        """CANCEL while ringing, BYE once answered."""
        if self.end_reason is None:
            self.end_reason = reason
        if self.call is not None:
            self.call.reject_now(487)

    def hangup_by_api(self) -> None:
        self._by_api = True
        self.end("bridge_ended")

    def fail(self, reason: str, message: str) -> None:
        if self.failure is None:
            self.failure = Failure(reason, message)

    # -- the leg's life ---------------------------------------------------------------------
    async def run(self) -> None:
        outcome: Outcome | None = None
        ended_at = time.time()
        try:
            if await self._ring():
                call = self.call
                assert call is not None
                self.writer.answered(call.answered_at)
                self.worker.report(self.live)
                self._report("answered", answered_at=call.answered_at)
                await call.wait_ended()
            outcome, ended_at = self._classify()
            self.writer.final(outcome, answered_at=self._answered_at(), ended_at=ended_at)
            if await self.writer.settled():
                self.worker.final(self.live, outcome, ended_at)
        except Exception as e:  # a bug still ends the leg with its final event
            log.exception("dial leg %s failed", self.call_id)
            self.fail("internal_error", f"{type(e).__name__}: {e}")
            if self.call is not None:
                self.call.reject_now(500)
                await self.call.wait_ended()
            if outcome is None:
                outcome, ended_at = self._classify()
                self.writer.final(outcome, answered_at=self._answered_at(), ended_at=ended_at)
                await self.writer.settled()
        finally:
            self.outcome = outcome
            self.worker.untrack(self.live, outcome, ended_at)
            self.worker.dial.legs.pop(self.call_id, None)
            self._close_media()
            self._report(
                "ended",
                sip_code=outcome.sip_code if outcome else 500,
                status=outcome.status if outcome else "failed",
                reason=outcome.reason if outcome else "internal_error",
                answered_at=self._answered_at(),
                ended_at=ended_at,
            )
            self._outbox.put_nowait(None)

    def _answered_at(self) -> float | None:
        return self.call.answered_at if self.call is not None else None

    async def _ring(self) -> bool:
        """Until answered (True) or over without an answer (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op.timeout_s
        while True:
            call = self.call
            assert call is not None
            try:
                await asyncio.wait_for(call.answer(), max(0.0, deadline - loop.time()))
                return True
            except CallGone:
                if call.answered:
                    return True
            except TimeoutError:
                if self.end_reason is None:
                    self.ring_timeout = True
                    log.info("dial leg %s: no answer within %gs; CANCEL", self.call_id,
                             self.op.timeout_s)
                call.reject_now(487)
                await call.wait_ended()
                return False
            if self.end_reason is not None or self.failure is not None or not self._targets:
                return False
            if not fails_over(call):
                return False
            nxt = self._targets.pop(0)
            try:
                self.call = self._dial(nxt)
            except OpRefused as e:
                self.fail(e.code, e.message)
                return False
            self._watch(self.call)
            self.worker.report(self.live)  # the supervisor follows the leg to its new trunk

    def _classify(self) -> tuple[Outcome, float]:
        call = self.call
        end = call.end if call is not None else None
        answered = end is not None and end.was_answered and self._answered_at() is not None
        by: EndedBy = "api" if self.end_reason is not None else (end.by if end else "local")
        outcome = classify(
            CallFacts(
                direction="outbound",
                answered=answered,
                sip_code=end.sip_code if end else 500,
                by=by,
                sip_reason=end.reason if end else "",
                failure=self.failure,
                ring_timeout=self.ring_timeout,
                q850=end.q850_cause if end else None,
            )
        )
        if outcome.status == "canceled" and self.end_reason is not None and not self._by_api:
            # The dial CANCELed it (not an API hangup): say why.
            outcome = dataclasses.replace(
                outcome, reason=f"dial_{self.end_reason}",
                message=_END_MESSAGES.get(self.end_reason, self.end_reason),
            )
        return outcome, (end.ended_at if end else time.time())

    # -- progress to the home ----------------------------------------------------------------
    def _report(self, state: str, **kw: Any) -> None:
        self._outbox.put_nowait(LegProgress(
            call_id=self.call_id, parent_call_id=self.parent_call_id, state=state,  # type: ignore[arg-type]
            **kw,
        ))

    async def _send_progress(self) -> None:
        while (msg := await self._outbox.get()) is not None:
            await self.worker.dial.report(msg, self.op.home_worker)

    def _close_media(self) -> None:
        if self.graph is not None:
            self.graph.clear()
            self.graph = None
        if self.link is not None:
            self.link.close()
