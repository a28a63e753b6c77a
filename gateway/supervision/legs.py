"""The node's side of supervision (registry.SupervisionLegs): where a supervised bridge lives,
the ops that start, steer and stop its supervisor leg there, the progress that comes back, and
the `call.supervision.*` events, written to the outbox like the call's own.

The supervised call may be either leg of a dial: the bridge is homed on the caller's worker,
so a child leg's supervision goes to its parent's worker. The supervisor's leg is placed by
that worker like any dial leg (gateway/dial/placement.py) and is a call of its own (its own
started/answered/final events, `parent_call_id` the supervised bridge's caller).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.calls.control import CALLS_NOT_FOUND, CAPACITY, ControlError
from gateway.calls.directory import CallDirectory
from gateway.calls.identity import CallIdentity
from gateway.control import errors as op_errors
from gateway.control.supervise_mode import SuperviseMode
from gateway.control.supervise_start import SuperviseStart
from gateway.control.supervise_stop import SuperviseStop
from gateway.control.supervision_update import SupervisionUpdate
from gateway.events.envelope import make_event
from gateway.events.outbox import AsyncOutbox
from gateway.supervision.registry import Supervision, Supervisions
from gateway.supervision.request import Mode
from gateway.workers.ipc import ChannelClosed, Requester

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
NOT_BRIDGED = "calls.not_bridged"
NOT_BRIDGED_OP = "not_bridged"  # the worker's Reply.code for a call without an answered bridge


@dataclass
class _Where:
    home: int  # the bridge's worker
    bridge_call_id: str  # the bridge's caller (what the home knows the bridge by)
    identity: CallIdentity  # the supervised call's, for the events


class NodeSupervisionLegs:
    def __init__(
        self,
        directory: CallDirectory,
        requester: Callable[[int], Requester | None],
        outbox: Callable[[], AsyncOutbox | None],
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self.directory = directory
        self._requester = requester
        self._outbox = outbox
        self._notify = notify  # wakes event delivery
        self.registry = Supervisions(self, self._event)
        self._where: dict[str, _Where] = {}  # supervision_id -> its bridge
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, handle_asks: Callable[[type[Any], Any], None]) -> None:
        handle_asks(SupervisionUpdate, self.update)

    # -- SupervisionLegs --------------------------------------------------------------------
    async def start(self, sup: Supervision) -> None:
        entry = self.directory.get(sup.call_id)
        if entry is None:
            raise ControlError(404, CALLS_NOT_FOUND, f"no live call {sup.call_id}")
        bridge_call = entry.identity.parent_call_id or sup.call_id
        home = self.directory.get(bridge_call)
        if home is None:
            raise ControlError(409, NOT_BRIDGED, f"call {sup.call_id} is not in a bridge")
        target = sup.supervisor
        kinds: dict[str, Literal["number", "sip", "client"]] = {
            "phone": "number", "sip": "sip", "client": "client"}
        kind = kinds[target["type"]]
        value = target["number"] if kind == "number" else target["identity"]
        self._where[sup.supervision_id] = _Where(home.worker, bridge_call, entry.identity)
        op = SuperviseStart(
            call_id=bridge_call, supervision_id=sup.supervision_id, kind=kind, target=value,
            mode=sup.mode, announce=sup.announce,
        )
        try:
            result = await self._ask(home.worker, op)
        except BaseException:
            self._where.pop(sup.supervision_id, None)
            raise
        self.registry.placed(sup.supervision_id, str(result.get("leg_id") or ""))

    async def set_mode(self, sup: Supervision, mode: Mode) -> None:
        where = self._where.get(sup.supervision_id)
        if where is None:
            raise ControlError(409, NOT_BRIDGED, "the supervised bridge has ended")
        await self._ask(where.home, SuperviseMode(
            call_id=where.bridge_call_id, supervision_id=sup.supervision_id, mode=mode))

    async def stop(self, sup: Supervision) -> None:
        where = self._where.get(sup.supervision_id)
        if where is None:
            return
        try:
            await self._ask(where.home, SuperviseStop(
                call_id=where.bridge_call_id, supervision_id=sup.supervision_id))
        except ControlError as e:  # the bridge (and so the tap) is gone already: ended anyway
            log.info("supervision %s: stop: %s", sup.supervision_id, e.message)

    async def _ask(self, index: int, op: Any) -> dict[str, Any]:
        req = self._requester(index)
        try:
            if req is None:
                raise ChannelClosed()
            reply = await req.request(op, REQUEST_TIMEOUT_S)
        except (ChannelClosed, TimeoutError):
            raise ControlError(409, NOT_BRIDGED, "the supervised call's worker is gone") from None
        if reply.ok:
            return reply.result
        code = reply.code or op_errors.FAILED
        if code in (op_errors.NO_SLOT, "trunk_capacity"):
            raise ControlError(503, CAPACITY, reply.message or "no capacity for the supervisor",
                               retry_after_s=2)
        if code in (NOT_BRIDGED_OP, op_errors.NOT_FOUND, op_errors.CALL_ENDED):
            raise ControlError(409, NOT_BRIDGED, reply.message or "the call is not bridged")
        if code == "no_trunk":
            raise ControlError(422, "calls.no_trunk", reply.message or "no trunk")
        raise ControlError(500, "internal_error", reply.message or code)

    # -- progress from the home ---------------------------------------------------------------
    async def update(self, worker: int, op: SupervisionUpdate) -> dict[str, Any]:
        reg = self.registry
        if op.state == "ringing":
            reg.ringing(op.supervision_id)
        elif op.state == "connected":
            reg.connected(op.supervision_id, op.at)
        else:
            reg.ended(op.supervision_id, op.reason or "ended")
            self._where.pop(op.supervision_id, None)
        return {}

    def worker_lost(self, index: int) -> None:
        for sid, where in list(self._where.items()):
            if where.home == index:
                self.registry.ended(sid, "worker_lost")  # its event still finds `where`
                del self._where[sid]

    # -- events -------------------------------------------------------------------------------
    def _event(self, sup: Supervision, kind: str, data: dict[str, Any]) -> None:
        where = self._where.get(sup.supervision_id)
        task = asyncio.ensure_future(self._write(sup, kind, data, where))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, sup: Supervision, kind: str, data: dict[str, Any],
                     where: _Where | None) -> None:
        """To where the supervised call's own events go (its first stored event's URL and
        secret); a call with no events destination has none for these either."""
        outbox = self._outbox()
        if outbox is None:
            return
        try:
            rows = await outbox.rows_for_call(sup.call_id)
            if not rows:
                log.info("supervision %s: %s not stored (the call has no events destination)",
                         sup.supervision_id, kind)
                return
            base = where.identity.event_base() if where is not None else {"call_id": sup.call_id}
            event = make_event(kind, rows[0].workspace_id, {**base, **data})
            first = rows[0]
            await outbox.append(event, url=first.url, secret=first.secret, policy=first.policy,
                                call_id=sup.call_id)
            self._notify()
        except Exception:
            log.exception("supervision %s: %s could not be stored", sup.supervision_id, kind)
