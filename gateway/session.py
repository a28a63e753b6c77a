"""One answered-or-answerable call's life in the gateway: the voice app, the interpreter, live
commands, and exactly one final event.

The final event is decided by the outcome classifier (gateway/calls/outcome.py) from how the SIP
call ended (who ended it, with which code, whether it was answered) plus why the gateway ended
it, if it did. It is written the moment the call ends, independent of whatever the interpreter
still does (a recording's upload after a hangup).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from dsl.context import CallContext, Dialer, FetchedDocument, Rooms, Streams, VoiceAppError
from dsl.interpreter import END, Fetch, Interpreter, RunResult
from gateway.calls.identity import CallIdentity
from gateway.calls.outcome import CallFacts, EndedBy, Failure, Outcome, classify
from gateway.calls.writer import CallEventWriter
from gateway.control.errors import CALL_ENDED, NOT_CONTROLLED, OpRefused
from gateway.control.originate import Mcp
from gateway.control.redirect import Redirect
from gateway.control.respond import Respond
from gateway.events.envelope import uuid7
from gateway.leg import SipCallLeg
from gateway.mcp import McpController
from gateway.prompts import GatewayPrompts
from gateway.voice_app import VoiceAppClient
from media.call import CallEnd, SipCall

log = logging.getLogger(__name__)

FirstDocument = FetchedDocument | Fetch


class TimedVoiceApp:
    """The voice app client, with each fetch's latency reported (callback fetch metric)."""

    def __init__(self, inner: VoiceAppClient, observe: Callable[[float, str], None]) -> None:
        self.inner = inner
        self.observe = observe

    async def fetch(
        self, url: str, method: str, extra: Mapping[str, str] | None = None
    ) -> FetchedDocument:
        t0 = time.monotonic()
        try:
            doc = await self.inner.fetch(url, method, extra)
        except VoiceAppError:
            self.observe(time.monotonic() - t0, "error")
            raise
        self.observe(time.monotonic() - t0, "ok")
        return doc

    async def post_json(self, url: str, payload: Mapping[str, Any]) -> None:
        await self.inner.post_json(url, payload)


class CallSession:
    """Runs a call's documents and ends it with one final event.

    Inbound sessions start at the INVITE (`call.started` is theirs to write); outbound ones are
    handed an answered call by the outbound runner, which wrote `call.started`/`call.answered`.
    """

    def __init__(
        self,
        *,
        call: SipCall,
        identity: CallIdentity,
        writer: CallEventWriter,
        app: VoiceAppClient | TimedVoiceApp,
        call_fields: dict[str, str],
        first_document: FirstDocument,
        voice_callback_url: str,
        prompts: GatewayPrompts,
        recordings_dir: Path,
        time_limit_s: float | None = None,
        mcp: Mcp | None = None,
        http: aiohttp.ClientSession | None = None,
        rooms: Rooms | None = None,
    ) -> None:
        self.call = call
        self.identity = identity
        self.call_id = identity.call_id
        self.writer = writer
        self.app = app
        self.call_fields = call_fields
        self.first_document = first_document
        self.voice_callback_url = voice_callback_url
        self.prompts = prompts
        self.recordings_dir = recordings_dir
        self.time_limit_s = time_limit_s
        self.mcp = mcp
        self.http = http
        self.rooms = rooms  # conference rooms (gateway/rooms/local.py)
        self.controller: McpController | None = None
        self.failure: Failure | None = None
        self.ended_by_api = False
        self.outcome: Outcome | None = None
        self.interpreter: Interpreter | None = None
        self.result: RunResult | None = None  # how the documents' run ended
        self.on_final: Callable[[Outcome, CallEnd], None] | None = None
        self.on_skip: Callable[[str, str], None] | None = None  # (verb, reason), for metrics
        self.on_state: Callable[[], None] | None = None  # ringing -> in-progress
        self.dialer: Dialer | None = None  # `dial` (the worker gives it, gateway/dial/home.py)
        self.streams: Streams | None = None  # `stream`, `aiAgent` (gateway/streams/registry.py)
        if not call.answered:
            call.on_answer.append(self._answered)

    @property
    def status(self) -> str:
        if self.outcome is not None:
            return self.outcome.status
        return "in-progress" if self.call.answered else "ringing"

    def _answered(self) -> None:
        self.call_fields["callStatus"] = "in-progress"
        self.writer.answered(self.call.answered_at)
        if self.on_state is not None:
            self.on_state()

    async def run(self, *, inbound_start: bool = True) -> None:
        if inbound_start:
            self.writer.started()
        if self.time_limit_s:
            limit = asyncio.get_running_loop().call_later(self.time_limit_s, self._time_limit)
        driver = asyncio.create_task(self._drive(), name=f"call-{self.call_id}")
        end = await self.call.wait_ended()
        if self.time_limit_s:
            limit.cancel()
        self.call_fields["callStatus"] = "completed"  # for requests made after the hangup
        outcome = self.write_final(end)
        # Over only once its final event is on disk: until then the worker keeps the call (a
        # crash now still gets it a final, from the supervisor, and only one).
        stored = await self.writer.settled()
        if self.on_final is not None and stored:  # else: kept, on_final_lost was called
            self.on_final(outcome, end)
        # The interpreter may still have work after a hangup (a recording to hand over).
        await asyncio.wait({driver}, timeout=30)
        if not driver.done():
            driver.cancel()
        elif not driver.cancelled() and (exc := driver.exception()) is not None:
            log.error("call %s: driver failed after the call ended", self.call_id,
                      exc_info=exc)
        self._log_summary(end)

    def _log_summary(self, end: CallEnd) -> None:
        """The call's one INFO line, at its end (the per-step lines are DEBUG)."""
        if not log.isEnabledFor(logging.INFO) or self.outcome is None:
            return
        o, r, answered = self.outcome, self.result, self.call.answered_at
        log.info(
            "call %s: %s%s, %s, %.1fs (answered %.1fs), SIP %d by %s, run %s, documents %d",
            self.call_id, o.status, f" ({o.reason})" if o.reason else "", self.identity.direction,
            end.ended_at - self.identity.created_at,
            end.ended_at - answered if answered is not None else 0.0,
            end.sip_code, "api" if self.ended_by_api else end.by,
            r.ended_by if r is not None else "-", r.documents if r is not None else 0,
        )

    def _time_limit(self) -> None:
        log.info("call %s: time limit of %gs reached; hanging up", self.call_id, self.time_limit_s)
        self.call.reject_now(200)

    async def _drive(self) -> None:
        leg = SipCallLeg(
            self.call, self.call_id, self.prompts.beep, self.writer.recording_state
        )
        ctx = CallContext(
            leg=leg,
            prompts=self.prompts,
            app=self.app,
            events=self.writer,
            voice_callback_url=self.voice_callback_url,
            recordings_dir=self.recordings_dir,
            on_skip=self.on_skip,
            rooms=self.rooms,
            dialer=self.dialer,
            streams=self.streams,
            params=self.call_fields,  # what a verb keeps there (DialCallStatus) rides every fetch
        )
        first = self.first_document
        if self.mcp is not None:
            assert self.http is not None
            self.controller = mcp = McpController.for_call(
                self.http, self.mcp, self.call_fields, leg=leg, prompts=self.prompts,
                inner=self.app,
            )
            ctx.app = mcp
            ctx.voice_callback_url = mcp.callback_url
            ctx.next_document = mcp.next_document
            first = mcp.opening()
        self.interpreter = Interpreter(ctx)
        try:
            if self.call.ended:  # answered and already over (a loop that lagged): nothing to ask
                return
            self.result = await self.interpreter.run(first)
        except VoiceAppError as e:
            log.warning("call %s: voice app failed: %s: %s", self.call_id, e.code, e.message)
            self.fail(e.code, e.message)
        except Exception as e:  # a bug must still end the call cleanly, with its final event
            log.exception("call %s: internal error", self.call_id)
            self.fail("internal_error", f"{type(e).__name__}: {e}")
        finally:
            if self.controller is not None:
                await self.controller.aclose()
            if not self.call.ended:
                # 500 only reaches the carrier when the call was never answered.
                await self.call.hangup(500 if self.failure else 603)

    # -- commands ---------------------------------------------------------------------------
    def hangup_by_api(self) -> None:
        """BYE when answered; before answer a final response (inbound). Idempotent."""
        if self.call.ended:
            return
        self.ended_by_api = True
        if self.interpreter is not None:
            self.interpreter.interrupt(END)  # the verb stops now (a recording is kept)
        self.call.reject_now(480 if self.identity.sip_direction == "inbound" else 487)

    def redirect(self, op: Redirect) -> None:
        """The current verb stops; the new document runs (validated by the API already)."""
        if op.actions is not None:
            repl: FetchedDocument | Fetch = FetchedDocument(
                body={"actions": op.actions}, url=self.voice_callback_url
            )
        else:
            assert op.url is not None
            repl = Fetch(op.url, op.method)
        if self.call.ended or self.interpreter is None or not self.interpreter.interrupt(repl):
            raise OpRefused(CALL_ENDED, "the call has ended")
        log.info("call %s: redirected by the API (%s)", self.call_id,
                 "inline actions" if op.actions is not None else op.url)

    def respond(self, op: Respond) -> None:
        if self.controller is None:
            raise OpRefused(NOT_CONTROLLED, "the call is not under MCP control")
        if not self.controller.respond(op.actions):
            raise OpRefused(CALL_ENDED, "the call has ended")

    def fail(self, reason: str, message: str) -> None:
        if self.failure is None:
            self.failure = Failure(reason, message)

    def write_final(self, end: CallEnd) -> Outcome:
        if self.outcome is not None:
            return self.outcome
        if self.call.media_failure is not None:  # e.g. sdp_missing (media.call)
            self.fail(*self.call.media_failure)
        by: EndedBy = "api" if self.ended_by_api else end.by
        self.outcome = outcome = classify(
            CallFacts(
                direction=self.identity.sip_direction,
                answered=end.was_answered and self.call.answered_at is not None,
                sip_code=end.sip_code,
                by=by,
                sip_reason=end.reason,
                failure=self.failure,
            )
        )
        self.writer.final(outcome, answered_at=self.call.answered_at, ended_at=end.ended_at)
        return outcome


def new_call_id() -> str:
    return uuid7()
