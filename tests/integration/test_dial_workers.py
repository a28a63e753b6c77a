"""`dial` across worker processes: an originated call (the API's) dials a second party on a
node whose workers hold one call each, so the leg cannot share the caller's worker and media
crosses through a media link pair. Who hears whom is measured on the phones' tones; a worker
killed while it holds one leg ends the other leg cleanly, each with exactly one final."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from typing import Any

import pytest

from gateway.demo import free_port_block
from tests import tones
from tests.integration.conftest import NUMBER, dump, final_events, worker_pids
from tests.integration.test_dial import children, dial_requests, of_call, trunk
from tests.integration.test_outbound import api
from tests.integration.tonephones import FarmFactory, PhoneFarm, phone_farm  # noqa: F401

pytestmark = pytest.mark.integration

A, B = "+254722000010", "+254722000011"
A_HZ, B_HZ = 697, 941


def two_workers(gateway_factory: Any, voice_app: Any, events_url: str, farm: PhoneFarm) -> Any:
    """Two workers of one call slot each, behind the managed front."""
    base = free_port_block(2)
    return gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url,
        workers=f"count = 2\ncalls_per_worker = 1\nreserved_slots = 0\nsip_port_start = {base}",
        kamailio='mode = "managed"\nping_interval_s = 1\nflood_limit = 0',
        extra=trunk(farm),
    )


async def originate_dial(gw: Any, voice_app: Any, dial: dict[str, Any]) -> str:
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    status, body = await api(gw, "POST", "/v1/calls/originate", {
        "to": A, "from": NUMBER, "actions": [{"dial": dial}],  # the number's app after it
    })
    assert status == 201, body
    return str(body["id"])


def placement(gw: Any, leg: str) -> tuple[int, int, bool]:
    """(the home's worker, the leg's worker, through a media link) from the home's log line."""
    m = re.search(rf"worker(\d+) gateway\.dial\.home: call \S+: dial leg {leg} to \S+ on "
                  rf"worker (\d+)( \(media link\))?", gw.log_text())
    assert m, gw.log_text()[-3000:]
    return int(m.group(1)), int(m.group(2)), m.group(3) is not None


async def leg_of(rec: Any, parent: str) -> str:
    assert await rec.wait_for(lambda evs: children(evs, parent), 10), dump(rec.events)
    return children(rec.events, parent)[0]


async def test_dial_bridges_both_ways_across_two_workers(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm = await phone_farm(behaviours={
        A: {"do": "answer", "tone": A_HZ},
        # 183 with its own media first (heard by the caller, through the link), then 200
        B: {"do": "early", "tone": B_HZ, "after": 1.2, "hangup_after": 3.0},
    })
    gw = two_workers(gateway_factory, voice_app, events_url, farm)
    parent = await originate_dial(gw, voice_app, {"number": B})
    a = (await farm.incoming(user=A))["id"]
    b = (await farm.incoming(user=B))["id"]
    await farm.wait(b, "media")
    t_early = time.time()
    await farm.wait(b, "answered")
    t_bridged = time.time()
    leg = await leg_of(rec, parent)
    home, there, linked = placement(gw, leg)
    assert home != there and linked, (home, there)  # a slot each: the leg is on the other one
    await farm.wait(b, "disconnected", 10)
    await farm.wait(a, "disconnected", 10)

    x, rate = farm.recording(a)
    e0, e1 = farm.offset(a, t_early) + 0.3, farm.offset(a, t_bridged) - 0.1
    assert tones.heard(x, rate, start_s=e0, end_s=e1) == {B_HZ}, tones.levels(x, rate, start_s=e0,
                                                                             end_s=e1)
    s = farm.offset(a, t_bridged) + 0.4
    assert tones.heard(x, rate, start_s=s, end_s=s + 2) == {B_HZ}, tones.levels(x, rate, start_s=s)
    y, rate = farm.recording(b)
    e0, e1 = farm.offset(b, t_early) + 0.3, farm.offset(b, t_bridged) - 0.1
    assert tones.heard(y, rate, start_s=e0, end_s=e1) == set()  # nobody hears the caller yet
    s = farm.offset(b, t_bridged) + 0.4
    assert tones.heard(y, rate, start_s=s, end_s=s + 2) == {A_HZ}, tones.levels(y, rate, start_s=s)

    form = dial_requests(voice_app)[0]
    assert (form["DialCallStatus"], form["DialCallSid"]) == ("completed", leg), form
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 2, 10), dump(rec.events)
    await asyncio.sleep(0.3)
    assert [e.kind for e in of_call(rec.events, leg)] == [
        "call.started", "call.answered", "call.completed"], dump(rec.events)
    final = final_events(rec.events, leg)[0].body["data"]
    assert (final["parent_call_id"], final["direction"]) == (parent, "outbound"), final
    assert final["from"] == NUMBER, final  # callerId default of an outbound call: its `from`
    assert [e.body["data"]["status"] for e in final_events(rec.events, parent)] == ["completed"]


@pytest.mark.parametrize("kill", ["leg", "home"])
async def test_a_worker_killed_holding_one_leg_ends_the_other(
    kill, phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm = await phone_farm(behaviours={
        A: {"do": "answer", "tone": A_HZ},
        B: {"do": "answer", "tone": B_HZ},
    })
    gw = two_workers(gateway_factory, voice_app, events_url, farm)
    parent = await originate_dial(gw, voice_app, {"number": B})
    a = (await farm.incoming(user=A))["id"]
    b = (await farm.incoming(user=B))["id"]
    await farm.wait(b, "answered")
    leg = await leg_of(rec, parent)
    assert await rec.wait_for(
        lambda evs: any(e.kind == "call.answered" for e in of_call(evs, leg)), 10)
    home, there, _ = placement(gw, leg)
    await asyncio.sleep(0.5)
    os.kill(worker_pids(gw)[there if kill == "leg" else home], signal.SIGKILL)

    # Both phones are hung up: the survivor's worker ends its side, the front the dead one's.
    await farm.wait(a, "disconnected", 10)
    await farm.wait(b, "disconnected", 10)
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 2, 10), dump(rec.events)
    await asyncio.sleep(1.0)
    lf = [e.body["data"] for e in final_events(rec.events, leg)]
    pf = [e.body["data"] for e in final_events(rec.events, parent)]
    assert len(lf) == 1 and len(pf) == 1, dump(rec.events)
    assert lf[0]["parent_call_id"] == parent and lf[0]["direction"] == "outbound"
    if kill == "leg":
        # The caller's dial is over (failed); the app hangs up; the caller's call completes.
        form = dial_requests(voice_app)[0]
        assert (form["DialCallStatus"], form["DialCallSid"]) == ("failed", leg), form
        assert (lf[0]["status"], lf[0]["reason"]) == ("failed", "worker_lost"), lf
        assert pf[0]["status"] == "completed", pf
    else:
        assert (pf[0]["status"], pf[0]["reason"]) == ("failed", "worker_lost"), pf
        assert lf[0]["status"] == "completed", lf  # BYE from its own worker
