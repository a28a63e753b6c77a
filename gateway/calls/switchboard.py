"""The supervisor's switchboard: implements the API's `CallControl` on the call directory.

Placing an outbound call: the `from` number's route (numbers / control plane / demo), where
its events and voice callbacks go, the trunks to try in order, then a worker with a free slot
(queued up to `[outbound] queue_s` for one, else 503) and an `Originate` request to it. A
command goes to the worker holding the call, and its reply comes back; a call whose worker is
gone is no longer live (its final event was written by the node): the API answers from its
record, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from config.settings import Settings
from gateway.calls.control import (
    CALL_EXISTS,
    CALL_NOT_ANSWERED,
    CALL_NOT_CONTROLLED,
    CALLS_ENDED,
    CALLS_NOT_FOUND,
    CAPACITY,
    NO_TRUNK,
    NUMBERS_NOT_FOUND,
    ControlError,
    OutboundCall,
)
from gateway.calls.directory import CallDirectory
from gateway.calls.identity import CallIdentity
from gateway.control import errors as op_errors
from gateway.control.hangup import Hangup
from gateway.control.originate import Mcp, Originate, TrunkTarget, events_destination
from gateway.control.redirect import Redirect
from gateway.control.respond import Respond
from gateway.control.stream_stop import StreamStop
from gateway.metrics import GaugeFn
from gateway.outbound.trunks import TrunkPool
from gateway.routing import Router, RoutingError
from gateway.workers.ipc import ChannelClosed, Requester

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0


class _Unknown(Exception):
    """The Originate reached a worker, which did not say whether it placed the call."""

PLACEMENT_OUTCOMES = ("placed", "no_slot", "trunk_capacity", "failed")


class Switchboard:
    def __init__(
        self,
        settings: Settings,
        directory: CallDirectory,
        router: Router,
        requester: Callable[[int], Requester | None],
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.router = router
        self._requester = requester
        self._draining = draining
        self._placing: set[str] = set()  # call_ids being placed (claimed before any await)
        self.trunks = TrunkPool(settings.trunks)
        self.queued = 0  # creates waiting for capacity (for /metrics)
        self._placements: dict[str, Counter] = {}  # per outcome, once registered

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """sautikit_outbound_placements_total{outcome} (placed, no_slot, trunk_capacity,
        failed), sautikit_outbound_queued (creates waiting for a slot or trunk), and the trunk
        pool's own families (calls and attempts by outcome per trunk)."""
        placements = Counter(
            "sautikit_outbound_placements_total",
            "Outbound call creates by placement outcome.",
            ["outcome"],
            registry=registry,
        )
        self._placements = {o: placements.labels(outcome=o) for o in PLACEMENT_OUTCOMES}
        registry.register(GaugeFn(
            "sautikit_outbound_queued",
            "Outbound call creates waiting for a free worker slot or trunk capacity.",
            lambda: [({}, float(self.queued))],
        ))
        self.trunks.register_metrics(registry)

    # -- CallControl ----------------------------------------------------------------------------
    def live_call(self, call_id: str) -> dict[str, Any] | None:
        entry = self.directory.get(call_id)
        return entry.summary() if entry else None

    def live_calls(self) -> list[dict[str, Any]]:
        return self.directory.summaries()

    async def command(self, op: Hangup | Redirect | Respond | StreamStop) -> dict[str, Any]:
        entry = self.directory.get(op.call_id)
        req = self._requester(entry.worker) if entry else None
        if entry is None or req is None:
            raise ControlError(404, CALLS_NOT_FOUND, f"no live call {op.call_id}")
        try:
            reply = await req.request(op, REQUEST_TIMEOUT_S)
        except ChannelClosed:
            raise ControlError(404, CALLS_NOT_FOUND,
                               f"call {op.call_id} was lost with its worker") from None
        except TimeoutError:
            raise ControlError(504, "calls.command_timeout",
                               f"worker {entry.worker} did not answer in time") from None
        if reply.ok:
            return reply.result
        if reply.code == op_errors.NOT_FOUND:
            raise ControlError(404, CALLS_NOT_FOUND, reply.message or "call not found")
        if reply.code == op_errors.NOT_ANSWERED:
            raise ControlError(409, CALL_NOT_ANSWERED, reply.message or "not answered")
        if reply.code == op_errors.CALL_ENDED:
            raise ControlError(409, CALLS_ENDED, reply.message or "the call has ended")
        if reply.code == op_errors.NOT_CONTROLLED:
            raise ControlError(409, CALL_NOT_CONTROLLED, reply.message or "not under control")
        raise ControlError(500, "internal_error", reply.message or "the command failed")

    async def originate(self, call: OutboundCall) -> dict[str, Any]:
        # Claimed before the first await: two creates with one call_id never both dial.
        if call.call_id in self._placing or self.directory.get(call.call_id) is not None:
            raise ControlError(409, CALL_EXISTS, f"a call {call.call_id} already exists")
        if self._draining():
            raise ControlError(503, CAPACITY, "the node is draining: it places no new calls", 5)
        self._placing.add(call.call_id)
        try:
            return await self._originate(call)
        finally:
            self._placing.discard(call.call_id)

    async def _originate(self, call: OutboundCall) -> dict[str, Any]:
        s = self.settings
        try:
            route = await self.router.resolve(call.from_, call.to)
        except RoutingError as e:
            raise ControlError(503, "numbers.resolve_failed", str(e), 5) from None
        if route is None:
            raise ControlError(422, NUMBERS_NOT_FOUND,
                               f"from: {call.from_} is not a number this gateway routes")
        if not s.trunks:
            raise ControlError(422, NO_TRUNK, "no [[trunks]] configured: outbound calls need one")
        secret = call.webhook_secret or route.webhook_secret
        if call.events_url and not secret:
            raise ControlError(422, "validation.bad_request",
                               "webhook_secret: required with events_url (the `from` number "
                               "has no webhook secret to sign its events with)")
        # Inline `actions` run first; what getDigits/record report, and a failure, still go to a
        # voice app: the one given, else the `from` number's.
        voice_url = call.voice_callback_url or route.voice_callback_url
        identity = CallIdentity(
            call_id=call.call_id,
            direction="outbound",
            from_=call.from_,
            to=call.to,
            number_id=route.number_id,
            workspace_id=route.workspace_id,
            created_at=time.time(),
            client_request_id=call.client_request_id,
            session_id=call.session_id,
        )
        mcp = None
        if call.control == "mcp":
            cp = s.control_plane
            if not cp.control_url or cp.secret is None:
                raise ControlError(422, "validation.bad_request",
                                   "control: mcp needs [control_plane] control_url and secret")
            mcp = Mcp(
                control_url=cp.control_url,
                control_secret=cp.secret.get_secret_value(),
                control_timeout_ms=call.control_timeout_ms or 10000,
                hold_audio_url=call.hold_audio_url,
                opening_actions=call.opening_actions,
                fallback_actions=call.fallback_actions,
            )
        deadline = time.monotonic() + s.outbound.queue_s
        targets = await self._targets(call.to, deadline)
        op = Originate(
            identity=identity.to_wire(),
            targets=targets,
            caller_id=call.caller_id or call.from_,
            timeout_s=call.timeout_s or s.outbound.ring_timeout_s,
            time_limit_s=call.time_limit_s,
            voice_callback_url=voice_url,
            voice_callback_method="GET" if call.voice_callback_method == "GET" else "POST",
            callback_body=route.callback_body,
            webhook_secret=secret,
            actions=call.actions,
            events=events_destination(
                s.control_plane, route.events_url, secret, call.events_url
            ),
            mcp=mcp,
        )
        try:
            return await self._place(op, deadline)
        except _Unknown as e:
            # The worker may have sent the INVITE: its CallState/CallEnded (or its loss) will
            # release the trunk; placing the call again elsewhere could ring the callee twice.
            raise ControlError(504, "calls.originate_unknown", str(e)) from None
        except BaseException:
            self.trunks.ended(targets[0].trunk)  # nothing was placed on it
            raise

    # -- helpers --------------------------------------------------------------------------------
    async def _targets(self, to: str, deadline: float) -> list[TrunkTarget]:
        """The trunks to try, in order; the first has a start and a call reserved on it. Waits
        (up to the deadline) while every trunk is at max_calls or max_cps."""
        while True:
            pick = self.trunks.pick(to, time.monotonic())
            if pick.targets:
                return list(pick.targets)
            left = deadline - time.monotonic()
            wait = pick.retry_in
            if left <= 0 or (wait is not None and wait > left):
                self._count("trunk_capacity")
                raise ControlError(503, CAPACITY, "every trunk is at its max_calls or max_cps",
                                   max(1, math.ceil(wait or 1)))
            self.queued += 1
            try:
                if wait is None:
                    await self._trunk_freed(left)
                else:
                    await asyncio.sleep(wait)
            finally:
                self.queued -= 1

    async def _trunk_freed(self, timeout: float) -> None:
        ev = asyncio.Event()

        def freed(_trunk: str) -> None:
            ev.set()

        self.trunks.on_ended.append(freed)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.trunks.on_ended.remove(freed)

    # -- what the supervisor reports as calls move ---------------------------------------------
    def trunk_moved(self, old: str | None, new: str | None) -> None:
        """An outbound call failed over from `old` to `new` (CallState with another trunk)."""
        if old == new:
            return
        if old is not None:
            self.trunks.ended(old, "failover")
        if new is not None:
            self.trunks.started(new)

    def trunk_done(self, trunk: str | None, status: str, answered: bool) -> None:
        if trunk is not None:
            self.trunks.ended(trunk, "answered" if answered else status)

    async def _place(self, op: Originate, deadline: float) -> dict[str, Any]:
        tried: set[int] = set()
        while True:
            index = self.directory.reserve(tried)
            if index is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._count("no_slot")
                    raise ControlError(503, CAPACITY, "no free call slot on this node", 5)
                self.queued += 1
                try:
                    if not await self.directory.wait_for_slot(left):
                        continue
                finally:
                    self.queued -= 1
                tried.clear()
                continue
            req = self._requester(index)
            try:
                if req is None:
                    raise ChannelClosed()
                reply = await req.request(op, REQUEST_TIMEOUT_S)
            except ChannelClosed as e:
                if e.sent:
                    self._count("failed")
                    raise _Unknown(f"worker {index} exited while placing the call") from None
                tried.add(index)  # never reached it: another worker may
                continue
            except TimeoutError:
                self._count("failed")
                raise _Unknown(f"worker {index} did not answer within {REQUEST_TIMEOUT_S:g} s; "
                               "the call may be ringing: see GET /v1/calls/{id}") from None
            finally:
                self.directory.release(index)
            if reply.ok:
                self._count("placed")
                summary = reply.result.get("call") or {}
                return dict(summary)
            if reply.code == op_errors.CALL_EXISTS:
                raise ControlError(409, CALL_EXISTS, reply.message or "call exists")
            if reply.code == op_errors.NO_SLOT:
                tried.add(index)
                continue
            self._count("failed")
            raise ControlError(502, "calls.originate_failed",
                               reply.message or "the worker could not place the call")

    def _count(self, outcome: str) -> None:
        child = self._placements.get(outcome)
        if child is not None:
            child.inc()
