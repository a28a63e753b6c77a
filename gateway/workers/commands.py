"""A worker's side of live control: the calls it holds, and each op a `Request` can carry
(gateway/control/*) applied to the call it names. Every request gets a `Reply`, also when the
call is gone or the op fails, so the supervisor never waits for nothing."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.calls.identity import CallIdentity
from gateway.control.errors import (
    CALL_EXISTS,
    FAILED,
    NO_SLOT,
    NOT_ANSWERED,
    NOT_FOUND,
    OpRefused,
)
from gateway.control.hangup import Hangup
from gateway.control.originate import Originate
from gateway.control.redirect import Redirect
from gateway.control.respond import Respond
from gateway.control.stream_stop import StreamStop
from gateway.workers.protocol import Reply, Request

if TYPE_CHECKING:
    from gateway.calls.outbound import OutboundRunner
    from gateway.calls.writer import CallEventWriter
    from gateway.dial.leg import DialLeg
    from gateway.session import CallSession
    from gateway.workers.worker import Worker
    from media.call import SipCall

log = logging.getLogger(__name__)

OpT = TypeVar("OpT")
# An op's handler on the worker: (worker, op) -> the Reply's result; raises OpRefused.
OpHandler = Callable[["Worker", Any], Awaitable[dict[str, Any]]]
# Ops that are not commands to one LiveCall (placing a leg, a room's links...), by type:
# each place that spans processes registers its own with `handles`.
HANDLERS: dict[type[Any], OpHandler] = {}


def handles(op: type[OpT]) -> Callable[[OpHandler], OpHandler]:
    def register(fn: OpHandler) -> OpHandler:
        HANDLERS[op] = fn
        return fn

    return register


@dataclass
class LiveCall:
    """A call on this worker: ringing outbound (`outbound`), or with a running `session`."""

    identity: CallIdentity
    session: CallSession | None = None
    outbound: OutboundRunner | None = None
    leg: DialLeg | None = None  # a dial's child leg (gateway/dial/leg.py)
    trunk_used: str | None = None  # the trunk an answered outbound call is on
    untracked: bool = False  # CallEnded sent
    final_lost: bool = False  # its final could not be stored: never untracked (see worker)

    @property
    def call_id(self) -> str:
        return self.identity.call_id

    @property
    def sip_call(self) -> SipCall | None:
        if self.session is not None:
            return self.session.call
        if self.leg is not None:
            return self.leg.call
        return self.outbound.call if self.outbound is not None else None

    @property
    def writer(self) -> CallEventWriter | None:
        if self.session is not None:
            return self.session.writer
        if self.leg is not None:
            return self.leg.writer
        return self.outbound.writer if self.outbound is not None else None

    @property
    def status(self) -> str:
        if self.session is not None:
            return self.session.status
        if self.leg is not None:
            return self.leg.status
        return "ringing"

    @property
    def trunk(self) -> str | None:
        if self.outbound is not None:
            return self.outbound.trunk
        if self.leg is not None:
            return self.leg.trunk
        return self.trunk_used

    @property
    def answered_at(self) -> float | None:
        call = self.sip_call
        return call.answered_at if call is not None else None

    def fail(self, reason: str, message: str) -> None:
        if self.session is not None:
            self.session.fail(reason, message)
        elif self.outbound is not None:
            self.outbound.fail(reason, message)
        elif self.leg is not None:
            self.leg.fail(reason, message)

    def cut(self, code: int) -> None:
        """End the call now (worker shutdown): BYE, CANCEL or a final response."""
        call = self.sip_call
        if call is not None:
            call.reject_now(code)

    def hangup(self) -> None:
        if self.session is not None:
            self.session.hangup_by_api()
        elif self.outbound is not None:
            self.outbound.hangup_by_api()
        elif self.leg is not None:
            self.leg.hangup_by_api()

    def redirect(self, op: Redirect) -> None:
        if self.session is None:
            raise OpRefused(NOT_ANSWERED, "the call is still ringing; redirect it once answered")
        self.session.redirect(op)

    async def stream_stop(self, op: StreamStop) -> int:
        if self.session is None:
            raise OpRefused(NOT_ANSWERED, "the call is still ringing; it has no stream")
        streams = self.session.streams
        return await streams.stop(op.name) if streams is not None else 0

    def respond(self, op: Respond) -> None:
        if self.session is None:
            raise OpRefused(NOT_ANSWERED, "the call is still ringing")
        self.session.respond(op)


async def handle_request(worker: Worker, req: Request) -> Reply:
    op = req.body
    try:
        result = await _apply(worker, op)
    except OpRefused as e:
        return Reply(id=req.id, ok=False, code=e.code, message=e.message)
    except Exception as e:
        log.exception("worker %d: %s failed", worker.index, op.op)
        return Reply(id=req.id, ok=False, code=FAILED, message=f"{type(e).__name__}: {e}")
    return Reply(id=req.id, ok=True, result=result)


async def _apply(worker: Worker, op: Any) -> dict[str, Any]:
    handler = HANDLERS.get(type(op))
    if handler is not None:
        return await handler(worker, op)
    if isinstance(op, Originate):
        from gateway.calls.outbound import OutboundRunner

        if str(op.identity.get("call_id")) in worker.calls:  # a repeated request: never dial twice
            raise OpRefused(CALL_EXISTS, f"call {op.identity.get('call_id')} is already here")
        if worker.draining or worker.stopping.is_set():
            raise OpRefused(NO_SLOT, f"worker {worker.index} is draining")
        runner = OutboundRunner(worker, op)
        return await runner.start()
    live = worker.calls.get(op.call_id)
    if live is None:
        raise OpRefused(NOT_FOUND, f"no call {op.call_id} on worker {worker.index}")
    if isinstance(op, Hangup):
        live.hangup()
    elif isinstance(op, Redirect):
        live.redirect(op)
    elif isinstance(op, Respond):
        live.respond(op)
    elif isinstance(op, StreamStop):
        stopped = await live.stream_stop(op)
        return {"call_id": live.call_id, "status": live.status, "stopped": stopped}
    return {"call_id": live.call_id, "status": live.status}
