"""The supervisor's dial placement against fake workers: the home first, another worker (with
the home's link) when the home is full, trunks reserved and released, progress and ends
forwarded between the two workers, and a lost worker's survivor told."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from config.settings import TrunkSettings
from gateway.calls.directory import CallDirectory
from gateway.calls.identity import CallIdentity
from gateway.control.dial_end import EndLeg
from gateway.control.dial_place import PlaceLeg
from gateway.control.dial_progress import LegProgress
from gateway.control.dial_start import StartLeg
from gateway.control.errors import OpRefused
from gateway.dial.placement import DialPlacement
from gateway.outbound.trunks import TrunkPool
from gateway.workers.protocol import Reply


class FakeWorker:
    def __init__(self, ok: bool = True, code: str | None = None) -> None:
        self.sent: list[Any] = []
        self.ok, self.code = ok, code

    async def request(self, body: Any, timeout: float = 5.0) -> Reply:
        self.sent.append(body)
        result = {"link": ["127.0.0.1", 40001]} if isinstance(body, StartLeg) and \
            body.home_link else {"link": None}
        return Reply(id=1, ok=self.ok, code=self.code, result=result if self.ok else {})


def setup(slots: tuple[int, int] = (2, 2)) -> tuple[DialPlacement, CallDirectory, TrunkPool,
                                                    list[FakeWorker]]:
    directory = CallDirectory()
    for i, n in enumerate(slots):
        directory.worker_ready(i, n)
    trunks = TrunkPool([TrunkSettings(name="t1", address="127.0.0.1:5090", max_cps=1000)])
    workers = [FakeWorker() for _ in slots]
    placement = DialPlacement(directory, trunks, lambda i: workers[i])  # type: ignore[arg-type,return-value]
    return placement, directory, trunks, workers


def place_op(call_id: str = "leg-1", kind: str = "number",
             target: str = "+254711000001") -> PlaceLeg:
    ident = CallIdentity(call_id=call_id, direction="outbound", from_="+254700000001",
                         to=target, number_id="n", workspace_id="w", created_at=0.0,
                         parent_call_id="parent-1")
    return PlaceLeg(leg=ident.to_wire(), kind=kind, target=target,  # type: ignore[arg-type]
                    caller_id="+254700000001", timeout_s=30, home_link=("127.0.0.1", 40000))


def occupy(directory: CallDirectory, worker: int, n: int) -> None:
    for k in range(n):
        ident = CallIdentity(call_id=f"c{worker}-{k}", direction="inbound", from_="a", to="b",
                             number_id="n", workspace_id="w", created_at=0.0)
        directory.update(worker, ident, "in-progress", None)


async def test_the_home_takes_its_own_leg_when_it_has_a_slot() -> None:
    placement, directory, trunks, workers = setup()
    occupy(directory, 0, 1)
    occupy(directory, 1, 0)  # worker 1 has more free slots, but the home is preferred
    got = await placement.place(0, place_op())
    assert got == {"worker": 0, "link": None}
    start = workers[0].sent[0]
    assert isinstance(start, StartLeg) and start.home_worker == 0 and start.home_link is None
    assert [t.trunk for t in start.targets] == ["t1"] and trunks.active("t1") == 1
    assert placement.legs == {}  # nothing to relay for a leg on its home


async def test_a_full_home_sends_the_leg_elsewhere_with_its_link() -> None:
    placement, directory, _, workers = setup()
    occupy(directory, 0, 2)
    got = await placement.place(0, place_op())
    assert got == {"worker": 1, "link": ["127.0.0.1", 40001]}
    start = workers[1].sent[0]
    assert start.home_worker == 0 and start.home_link == ("127.0.0.1", 40000)
    assert placement.legs["leg-1"].worker == 1


async def test_a_sip_target_takes_no_trunk_and_a_refusal_frees_the_trunk() -> None:
    placement, _, trunks, workers = setup()
    await placement.place(0, place_op(kind="sip", target="sip:bob@127.0.0.1:5099"))
    assert workers[0].sent[0].targets[0].trunk is None and trunks.active("t1") == 0
    workers[0].ok, workers[0].code = False, "invite_failed"
    with pytest.raises(OpRefused):
        await placement.place(0, place_op("leg-2"))
    assert trunks.active("t1") == 0


async def test_no_slot_anywhere_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.dial.placement.SLOT_WAIT_S", 0.05)
    placement, directory, _, _ = setup((1, 1))
    occupy(directory, 0, 1)
    occupy(directory, 1, 1)
    with pytest.raises(OpRefused) as err:
        await placement.place(0, place_op())
    assert err.value.code == "no_slot"


async def test_progress_reaches_the_home_and_ends_reach_the_leg() -> None:
    placement, directory, _, workers = setup()
    occupy(directory, 0, 2)
    await placement.place(0, place_op())
    await placement.progress(1, LegProgress(call_id="leg-1", parent_call_id="parent-1",
                                            state="answered", answered_at=1.0))
    await placement.end(0, EndLeg(call_id="leg-1", reason="parent_hangup"))
    assert [m.op for m in workers[0].sent] == ["dial_progress"]
    assert [m.op for m in workers[1].sent] == ["dial_start", "dial_end"]
    await placement.progress(1, LegProgress(call_id="leg-1", parent_call_id="parent-1",
                                            state="ended", status="completed"))
    assert "leg-1" not in placement.legs


@pytest.mark.parametrize("lost", [0, 1])
async def test_a_lost_worker_s_survivor_is_told(lost: int) -> None:
    placement, directory, _, workers = setup()
    occupy(directory, 0, 2)
    await placement.place(0, place_op())  # home 0, leg on 1
    placement.worker_lost(lost)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    survivor = workers[1 - lost].sent[-1]
    if lost == 1:  # the leg's worker: the home hears the leg ended
        assert isinstance(survivor, LegProgress)
        assert (survivor.state, survivor.status, survivor.reason) == ("ended", "failed",
                                                                      "worker_lost")
    else:  # the home: the leg is ended
        assert isinstance(survivor, EndLeg) and survivor.reason == "parent_lost"
    assert placement.legs == {}
