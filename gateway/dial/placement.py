"""The supervisor's part in dials: where each child leg goes, and the legs in flight between
two workers (their home and the worker holding the leg's call).

A home's `PlaceLeg` ask: trunks picked here (the switchboard's `TrunkPool`: it holds the trunk
counters; a `sip:` target goes through the front as is), a slot reserved in the directory with
the home preferred (media then stays in one bridge), and `StartLeg` sent to that worker. A
leg on another worker is kept here (`legs`) until it ends: its progress (`LegProgress` asks
from the leg's worker) is forwarded to its home, the home's `EndLeg` to the leg's worker, and
when either worker dies the survivor is told (`worker_lost`): the leg's home gets an `ended`
(`worker_lost`, the supervisor writes the leg's final), or the leg is ended (`parent_lost`).
A leg on its home worker needs none of this: the home follows it in process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.calls.directory import CallDirectory
from gateway.control import errors as op_errors
from gateway.control.dial_end import EndLeg
from gateway.control.dial_place import PlaceLeg
from gateway.control.dial_progress import LegProgress
from gateway.control.dial_start import LegTarget, StartLeg
from gateway.control.errors import NO_SLOT, NOT_FOUND, OpRefused
from gateway.outbound.trunks import TrunkPool
from gateway.workers.ipc import ChannelClosed, Requester
from gateway.workers.protocol import Reply

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
# How long a leg waits for a trunk's rate limit (max_cps) to let it start (`numbers` ring at
# once, and a trunk's bucket may hold a single start), or for a slot: one being placed counts
# twice for a moment (its CallState arrives before its reservation is released).
RATE_WAIT_S = 5.0
SLOT_WAIT_S = 2.0


@dataclass
class LegInFlight:
    call_id: str
    parent_call_id: str
    home: int  # the bridge's worker
    worker: int  # the leg's worker (another one)
    home_link: tuple[str, int] | None = None  # the media link's ends (loopback UDP)
    leg_link: tuple[str, int] | None = None


class DialPlacement:
    def __init__(
        self,
        directory: CallDirectory,
        trunks: TrunkPool,
        requester: Callable[[int], Requester | None],
        client_domain: str | None = None,
        on_client_leg: Callable[[], None] = lambda: None,
    ) -> None:
        self.client_domain = client_domain  # [webrtc] domain; None: browser calling is off
        self._on_client_leg = on_client_leg
        self.directory = directory
        self.trunks = trunks
        self._requester = requester
        self.legs: dict[str, LegInFlight] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, handle_asks: Callable[[type[Any], Any], None]) -> None:
        handle_asks(PlaceLeg, self.place)
        handle_asks(LegProgress, self.progress)
        handle_asks(EndLeg, self.end)

    # -- asks -------------------------------------------------------------------------------
    async def place(self, home: int, op: PlaceLeg) -> dict[str, Any]:
        targets = await self._targets(op)
        trunk = targets[0].trunk
        tried: set[int] = set()
        call_id = str(op.leg["call_id"])
        deadline = time.monotonic() + min(SLOT_WAIT_S, op.timeout_s)
        try:
            while True:
                index = self.directory.reserve(tried, prefer=home)
                if index is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise OpRefused(NO_SLOT, "no free call slot on this node for the dial leg")
                    if await self.directory.wait_for_slot(left):
                        tried.clear()
                    continue
                req = self._requester(index)
                start = StartLeg(
                    leg=op.leg, targets=targets, caller_id=op.caller_id, timeout_s=op.timeout_s,
                    events=op.events, home_worker=home,
                    home_link=op.home_link if index != home else None,
                )
                if index != home:  # before the request: its progress may beat the reply
                    self.legs[call_id] = LegInFlight(call_id, str(op.leg.get("parent_call_id")),
                                                     home, index, op.home_link)
                try:
                    if req is None:
                        raise ChannelClosed()
                    reply = await req.request(start, REQUEST_TIMEOUT_S)
                except ChannelClosed as e:
                    self.legs.pop(call_id, None)
                    if e.sent:
                        trunk = None  # the leg may exist: its end (or loss) frees the trunk
                        raise OpRefused("leg_lost", f"worker {index} exited placing the leg") \
                            from None
                    tried.add(index)
                    continue
                except TimeoutError:
                    trunk = None
                    raise OpRefused("leg_unknown", f"worker {index} did not answer in time") \
                        from None
                finally:
                    self.directory.release(index)
                if reply.ok:
                    trunk = None  # the leg's CallEnded frees it
                    link = reply.result.get("link")
                    if call_id in self.legs and link:
                        self.legs[call_id].leg_link = (str(link[0]), int(link[1]))
                    return {"worker": index, "link": link}
                self.legs.pop(call_id, None)
                if reply.code == op_errors.NO_SLOT:
                    tried.add(index)
                    continue
                raise OpRefused(reply.code or op_errors.FAILED, reply.message or "not placed")
        finally:
            if trunk is not None:
                self.trunks.ended(trunk)  # reserved by `_targets`, never used

    async def _targets(self, op: PlaceLeg) -> list[LegTarget]:
        """The trunks to try in order (the first has a call reserved), waiting out a rate
        limit for up to RATE_WAIT_S; a sip: target as is."""
        if op.kind == "sip":
            return [LegTarget(uri=op.target)]
        if op.kind == "client":
            if self.client_domain is None:
                raise OpRefused("webrtc_disabled",
                                f"client:{op.target}: browser calling is off ([webrtc] enabled)")
            # The front rings every registration of the name (404 when there is none).
            self._on_client_leg()
            return [LegTarget(uri=f"sip:{op.target}@{self.client_domain}")]
        if not len(self.trunks):
            raise OpRefused("no_trunk", "no [[trunks]] configured: dialling numbers needs one")
        deadline = time.monotonic() + min(RATE_WAIT_S, op.timeout_s)
        while True:
            pick = self.trunks.pick(op.target, time.monotonic())
            if pick.targets:
                return [LegTarget(uri=t.uri, trunk=t.trunk) for t in pick.targets]
            wait = pick.retry_in
            if wait is None or time.monotonic() + wait > deadline:
                raise OpRefused("trunk_capacity", "every trunk is at its max_calls or max_cps")
            await asyncio.sleep(wait)

    async def progress(self, worker: int, op: LegProgress) -> dict[str, Any]:
        leg = self.legs.get(op.call_id)
        if leg is None:
            raise OpRefused(NOT_FOUND, f"no dial leg {op.call_id} in flight")
        if op.state == "ended":
            del self.legs[op.call_id]
        reply = await self._send(leg.home, op)
        if op.state != "ended" and (reply is None or reply.code == NOT_FOUND):
            # the home is gone or no longer waits for it: the leg's worker ends it
            self.legs.pop(op.call_id, None)
            raise OpRefused(NOT_FOUND, f"no bridge waits for dial leg {op.call_id}")
        return {}

    async def end(self, home: int, op: EndLeg) -> dict[str, Any]:
        leg = self.legs.get(op.call_id)
        if leg is None:
            raise OpRefused(NOT_FOUND, f"no dial leg {op.call_id} in flight")
        await self._send(leg.worker, op)
        return {}

    # -- a worker died ------------------------------------------------------------------------
    def worker_lost(self, index: int) -> None:
        """Tell the survivor of each leg in flight that touched worker `index`."""
        now = time.time()
        for leg in [leg for leg in self.legs.values() if index in (leg.home, leg.worker)]:
            del self.legs[leg.call_id]
            if leg.worker == index:
                entry = self.directory.get(leg.call_id)  # gone already when worker_gone ran
                msg: LegProgress | EndLeg = LegProgress(
                    call_id=leg.call_id, parent_call_id=leg.parent_call_id, state="ended",
                    status="failed", reason="worker_lost", sip_code=503, ended_at=now,
                    answered_at=entry.answered_at if entry is not None else None,
                )
                self._spawn(self._send(leg.home, msg))
            else:
                self._spawn(self._send(leg.worker, EndLeg(call_id=leg.call_id,
                                                          reason="parent_lost")))
            log.warning("dial leg %s: worker %d lost; told worker %d", leg.call_id, index,
                        leg.home if leg.worker == index else leg.worker)

    # -- helpers ----------------------------------------------------------------------------
    async def _send(self, index: int, op: LegProgress | EndLeg) -> Reply | None:
        """The worker's reply; None when it is gone (or did not answer)."""
        req = self._requester(index)
        if req is None:
            return None
        try:
            reply = await req.request(op, REQUEST_TIMEOUT_S)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("dial leg %s: %s to worker %d not delivered: %r", op.call_id, op.op,
                        index, e)
            return None
        if not reply.ok:
            log.info("dial leg %s: %s on worker %d: %s", op.call_id, op.op, index, reply.message)
        return reply

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
