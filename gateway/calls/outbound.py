"""An outbound call on a worker, from the supervisor's `Originate` to its final event.

INVITE through the first trunk (via the node's SIP front); a trunk that answers 503, or 408
without having sent any provisional response (dead or unreachable), hands over to the next
one. Ringing is bounded by `timeout_s` (then CANCEL: no_answer). On answer the voice app is
asked for its document (callStatus in-progress) and the call runs as a `CallSession`; on any
failure the voice app is told once (callStatus busy / no-answer / failed / canceled) and its
reply is ignored. Exactly one final event either way, from the outcome classifier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from dsl.context import FetchedDocument, VoiceAppError
from dsl.interpreter import Fetch
from gateway.calls.identity import CallIdentity
from gateway.calls.outcome import CallFacts, EndedBy, Failure, Outcome, classify
from gateway.control.errors import NO_SLOT, OpRefused
from gateway.control.originate import Originate, TrunkTarget
from gateway.outbound.trunks import should_fail_over
from gateway.session import CallSession
from gateway.workers.commands import LiveCall
from media.call import CallGone, CallSetupError, NoCallSlot, SipCall

if TYPE_CHECKING:
    from gateway.workers.worker import Worker

log = logging.getLogger(__name__)

MAX_QUERY_ID_BYTES = 2048  # clientRequestId goes on the callback URL only up to this


def with_client_request_id(url: str, crid: str | None) -> str:
    """`?clientRequestId=` on the voice callback URL, unless its encoded form is too long."""
    if not crid:
        return url
    enc = quote(crid, safe="")
    if len(enc.encode()) > MAX_QUERY_ID_BYTES:
        return url
    parts = urlsplit(url)
    query = f"{parts.query}&clientRequestId={enc}" if parts.query else f"clientRequestId={enc}"
    return urlunsplit(parts._replace(query=query))


def fails_over(call: SipCall) -> bool:
    """Whether the trunk, not the callee, failed (nothing rang first): try the next trunk."""
    end = call.end
    if end is None:
        return False
    return should_fail_over(
        end.sip_code, rang=call.provisional_code is not None, answered=end.was_answered
    )


class OutboundRunner:
    def __init__(self, worker: Worker, op: Originate) -> None:
        self.worker = worker
        self.op = op
        self.identity = CallIdentity.from_wire(op.identity).with_(worker=worker.index)
        self.call_id = self.identity.call_id
        self.writer = worker.writer(self.identity, op.events)
        self.call: SipCall | None = None
        self.live = LiveCall(self.identity, outbound=self)
        self.failure: Failure | None = None
        self.api_hangup = False
        self.ring_timeout = False
        self.attempts = 0
        self.trunk: str | None = None  # the trunk of the current attempt
        self._targets = list(op.targets)

    # -- start: the first INVITE on the wire ----------------------------------------------------
    async def start(self) -> dict[str, Any]:
        if not self._targets:
            raise OpRefused("no_trunk", "no trunk to place the call through")
        self.call = call = self._dial(self._targets.pop(0))
        try:
            self.worker.track(self.live)
            self.writer.started()
        except BaseException:
            # The INVITE is out but the call cannot be followed: end it at once and say so.
            call.reject_now(500)
            self.worker.untrack(self.live, None, time.time())
            raise
        self.worker._spawn(self.run())
        return {"call": self.identity.summary("ringing"), "sip_call_id": self.identity.sip_call_id}

    def _dial(self, target: TrunkTarget) -> SipCall:
        host = self.worker.from_host
        try:
            # Every slot may carry an outbound call (the directory counts all 4): an INVITE
            # that then finds the worker full gets pjsua2's own 486, which the front takes
            # as "worker full" and offers to the next worker.
            call = self.worker.endpoint.make_call(
                target.uri, trunk=target.trunk, from_uri=f"sip:{self.op.caller_id}@{host}",
                last_slot=True,
            )
        except NoCallSlot as e:  # every pjsua2 slot taken: the supervisor tries another worker
            raise OpRefused(NO_SLOT, f"worker {self.worker.index}: {e}") from e
        except CallSetupError as e:
            raise OpRefused("invite_failed", f"could not send the INVITE to {target.uri}: {e}") \
                from e
        self.trunk = target.trunk
        self.attempts += 1
        log.info("call %s: INVITE %s via trunk %s (attempt %d)", self.call_id, target.uri,
                 target.trunk, self.attempts)
        return call

    # -- commands ------------------------------------------------------------------------------
    def hangup_by_api(self) -> None:
        """Before answer: CANCEL (the outcome is `canceled`)."""
        self.api_hangup = True
        if self.call is not None:
            self.call.reject_now(487)

    def fail(self, reason: str, message: str) -> None:
        if self.failure is None:
            self.failure = Failure(reason, message)

    # -- the call's life -------------------------------------------------------------------------
    async def run(self) -> None:
        outcome: Outcome | None = None
        ended_at = time.time()
        try:
            answered = await self._ring()
            if answered:
                outcome = await self._talk()
                end = self.call.end if self.call else None
                ended_at = end.ended_at if end else time.time()
            else:
                outcome, ended_at = await self._unanswered()
                self.worker.untrack(self.live, outcome, ended_at)  # slot and trunk free now
                await self._tell_app(outcome)
        except Exception as e:  # a bug still ends the call with its final event
            log.exception("call %s: outbound runner failed", self.call_id)
            self.fail("internal_error", f"{type(e).__name__}: {e}")
            if self.call is not None:
                self.call.reject_now(500)
                await self.call.wait_ended()
            if outcome is None and (self.live.session is None):
                outcome, ended_at = await self._unanswered()
        finally:
            if outcome is None and self.live.session is not None:
                outcome = self.live.session.outcome
            self.worker.untrack(self.live, outcome, ended_at)

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
                if call.answered:  # answered, then no media (media_failure): the session
                    return True  # reports it (call.failed sdp_missing / the SIP end)
            except TimeoutError:
                self.ring_timeout = True
                log.info("call %s: no answer within %gs; CANCEL", self.call_id, self.op.timeout_s)
                call.reject_now(487)
                await call.wait_ended()
                # A 200 OK crossing our CANCEL: the call was answered after all (and is hung up
                # by the CANCEL's BYE); it counts as not answered within the ring time.
                return False
            if self.api_hangup or self.failure is not None or not self._targets:
                return False
            if not fails_over(call):
                return False
            assert call.end is not None
            nxt = self._targets.pop(0)
            log.warning("call %s: trunk answered %d %s; trying trunk %s", self.call_id,
                        call.end.sip_code, call.end.reason, nxt.trunk)
            try:
                self.call = self._dial(nxt)
            except OpRefused as e:
                self.fail(e.code, e.message)
                return False
            self.worker.report(self.live)  # the supervisor follows the call to its new trunk

    async def _unanswered(self) -> tuple[Outcome, float]:
        call = self.call
        end = call.end if call is not None else None
        by: EndedBy = "api" if self.api_hangup else (end.by if end else "local")
        outcome = classify(
            CallFacts(
                direction="outbound",
                answered=False,
                sip_code=end.sip_code if end else 500,
                by=by,
                sip_reason=end.reason if end else "",
                failure=self.failure,
                ring_timeout=self.ring_timeout,
                q850=end.q850_cause if end else None,
            )
        )
        ended_at = end.ended_at if end else time.time()
        self.writer.final(outcome, answered_at=None, ended_at=ended_at)
        # over (untracked) only once its final is on disk; if it cannot be, never
        if await self.writer.settled():
            self.worker.final(self.live, outcome, ended_at)
        return outcome, ended_at

    async def _tell_app(self, outcome: Outcome) -> None:
        """The voice app hears of the failure once (the quickstart: 'when the remote party
        answers (or fails)'); what it answers is ignored."""
        url = self.op.voice_callback_url
        if not url:
            return
        fields = self.identity.callback_fields(outcome.callback_status)
        fields["sipCode"] = str(outcome.sip_code)
        if outcome.reason:
            fields["reason"] = outcome.reason
        app = self.worker.voice_app(fields, self.op.webhook_secret, self.op.callback_body)
        try:
            await app.fetch(with_client_request_id(url, self.identity.client_request_id),
                            self.op.voice_callback_method)
        except VoiceAppError as e:
            log.info("call %s: failure callback: %s (ignored)", self.call_id, e.code)

    async def _talk(self) -> Outcome | None:
        call = self.call
        assert call is not None
        self.writer.answered(call.answered_at)
        op = self.op
        fields = self.identity.callback_fields("in-progress")
        app = self.worker.voice_app(fields, op.webhook_secret, op.callback_body)
        url = with_client_request_id(
            op.voice_callback_url or f"{self.worker.api_base}/v1/calls/{self.call_id}",
            self.identity.client_request_id,
        )

        first: FetchedDocument | Fetch = (
            FetchedDocument(body={"actions": op.actions}, url=url)
            if op.actions is not None
            else Fetch(url, op.voice_callback_method)
        )
        session = CallSession(
            call=call,
            identity=self.identity,
            writer=self.writer,
            app=app,
            call_fields=fields,
            first_document=first,
            voice_callback_url=url,
            prompts=self.worker.prompts,
            recordings_dir=self.worker.recordings_dir,
            time_limit_s=op.time_limit_s,
            mcp=op.mcp,
            http=self.worker.cp_http,
            rooms=self.worker.rooms,
        )
        if self.failure is not None:
            session.fail(self.failure.reason, self.failure.message)
        session.on_final = lambda outcome, end: self.worker.final(self.live, outcome, end.ended_at)
        session.on_skip = self.worker.skipped
        self.live.session = session
        self.live.outbound = None
        self.live.trunk_used = self.trunk
        self.worker.report(self.live)
        if self.api_hangup:  # the hangup crossed the 200 OK: BYE, no document
            session.hangup_by_api()
        await session.run(inbound_start=False)
        return session.outcome
