"""Call supervision end to end: a phone farm caller (the customer) dialled through to an agent,
then a supervisor's phone called in through the API, in each mode, switched live with PATCH.
Who hears whom is measured on each phone's own tone (Goertzel on its recording), never taken
from the API's state; the supervision events and the supervisor leg's own final are checked."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.demo import free_port_block
from tests import tones
from tests.integration.conftest import dump, final_events
from tests.integration.tonephones import FarmFactory, PhoneFarm, phone_farm  # noqa: F401

pytestmark = pytest.mark.integration

CUSTOMER_HZ, AGENT_HZ, SUPERVISOR_HZ = 697, 941, 1209
AGENT, SUPERVISOR, BUSY_SUP = "+254711000021", "+254711000022", "+254711000023"
BEHAVIOURS = {
    AGENT: {"do": "answer", "tone": AGENT_HZ, "after": 0.3},
    SUPERVISOR: {"do": "answer", "tone": SUPERVISOR_HZ, "after": 0.5},
    BUSY_SUP: {"do": "busy"},
}
AUTH = {"Authorization": "Bearer test-token"}
WINDOW_S = 1.4  # each mode is heard for this long before the next change


def trunk(farm: PhoneFarm) -> str:
    return f'[[trunks]]\nname = "farm"\naddress = "{farm.host_port}"\nmax_cps = 200\n'


async def api(http: aiohttp.ClientSession, gw: Any, method: str, path: str,
              **kw: Any) -> tuple[int, Any]:
    headers = {**AUTH, **kw.pop("headers", {})}
    async with http.request(method, f"http://127.0.0.1:{gw.api_port}{path}", headers=headers,
                            **kw) as r:
        return r.status, await r.json()


def heard(farm: PhoneFarm, phone: str, a: float, b: float) -> set[int]:
    x, rate = farm.recording(phone)
    return tones.heard(x, rate, start_s=farm.offset(phone, a), end_s=farm.offset(phone, b))


# One worker: the supervisor's leg joins the bridge in C. Two workers of two slots: the
# customer and the agent fill the first, so the supervisor's leg lands on the second and
# joins through a media link.
PLACES = {
    "same_worker": {"workers": "count = 1\ncalls_per_worker = 4"},
    "other_worker": {
        "workers": "count = 2\ncalls_per_worker = 2\nreserved_slots = 0\nsip_port_start = {base}",
        "kamailio": 'mode = "managed"\nping_interval_s = 1\nflood_limit = 0',
    },
}


def placed(place: str) -> dict[str, str]:
    kw = dict(PLACES[place])
    kw["workers"] = kw["workers"].format(base=free_port_block(2))
    return kw


@pytest.mark.parametrize("place", list(PLACES))
async def test_listen_whisper_barge_by_the_tones_heard(
    place, phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm = await phone_farm(behaviours=BEHAVIOURS, tone=CUSTOMER_HZ)
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url, extra=trunk(farm), **placed(place))

    def script(req: Any, form: dict[str, str]) -> Any:
        if "DialCallStatus" in form:
            return {"actions": [{"hangup": {}}]}
        return {"actions": [{"dial": {"number": AGENT}}]}

    voice_app.script = script
    customer = await farm.call(gw.uri, CUSTOMER_HZ, from_user="+254733000009")
    agent = (await farm.incoming(user=AGENT, nth=0))["id"]
    await farm.wait(agent, "answered", 10)
    call_id = str(voice_app.requests[0]["form"]["callId"])
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as http:
        body = {"mode": "listen", "supervisor": {"type": "phone", "number": SUPERVISOR},
                "announce": "agent", "label": "qa"}
        status, sup = await api(http, gw, "POST", f"/v1/calls/{call_id}/supervision", json=body,
                                headers={"Idempotency-Key": "sup-k1"})
        assert status == 201 and sup["state"] in ("connecting", "ringing"), sup
        status, again = await api(http, gw, "POST", f"/v1/calls/{call_id}/supervision",
                                  json=body)
        assert status == 409 and again["error"]["code"] == "calls.supervision_in_progress"
        phone = (await farm.incoming(user=SUPERVISOR, nth=0))["id"]
        # PATCH before the supervisor answers: 409, it still rings
        status, early = await api(http, gw, "PATCH", f"/v1/calls/{call_id}/supervision",
                                  json={"mode": "barge"})
        assert status == 409 and early["error"]["code"] == "calls.supervision_not_connected"
        await farm.wait(phone, "answered", 10)
        for _ in range(40):
            status, got = await api(http, gw, "GET", f"/v1/calls/{call_id}/supervision")
            if got["supervision"]["state"] == "connected":
                break
            await asyncio.sleep(0.1)
        assert got["supervision"]["state"] == "connected", got
        assert got["supervision"]["supervisor_leg_id"], got
        t_joined = time.time()

        marks: dict[str, tuple[float, float]] = {}
        for mode in ("listen", "whisper", "barge"):
            if mode != "listen":
                status, changed = await api(http, gw, "PATCH",
                                            f"/v1/calls/{call_id}/supervision",
                                            json={"mode": mode})
                assert status == 200 and changed["mode"] == mode, changed
            t0 = time.time() + 0.4
            await asyncio.sleep(WINDOW_S)
            marks[mode] = (t0, time.time() - 0.1)
        status, ended = await api(http, gw, "DELETE", f"/v1/calls/{call_id}/supervision")
        assert status == 200 and ended["state"] == "ended", ended
        t_off = time.time()
        await farm.wait(phone, "disconnected", 10)
        await asyncio.sleep(1.2)
        after = (t_off + 0.6, time.time() - 0.1)
        await farm.hangup(customer)
        await farm.wait(agent, "disconnected", 10)

    want = {
        "listen": ({CUSTOMER_HZ, AGENT_HZ}, {AGENT_HZ}, {CUSTOMER_HZ}),
        "whisper": ({CUSTOMER_HZ, AGENT_HZ}, {AGENT_HZ}, {CUSTOMER_HZ, SUPERVISOR_HZ}),
        "barge": ({CUSTOMER_HZ, AGENT_HZ}, {AGENT_HZ, SUPERVISOR_HZ},
                  {CUSTOMER_HZ, SUPERVISOR_HZ}),
    }
    for mode, (sup_hears, customer_hears, agent_hears) in want.items():
        a, b = marks[mode]
        assert heard(farm, phone, a, b) == sup_hears, (mode, "supervisor")
        assert heard(farm, customer, a, b) == customer_hears, (mode, "customer")
        assert heard(farm, agent, a, b) == agent_hears, (mode, "agent")
    # announce "agent": a beep to the agent as the supervisor joins, not to the customer
    for who, want_beep in ((agent, True), (customer, False)):
        x, rate = farm.recording(who)
        a = farm.offset(who, t_joined - 1.0)
        beeps = tones.block_levels(x[int(a * rate):int((a + 1.6) * rate)], rate, 1000)
        assert (max(beeps) > -30) == want_beep, (who, max(beeps))
    # the bridge goes on once the supervisor has left: the two still hear each other only
    assert heard(farm, customer, *after) == {AGENT_HZ}
    assert heard(farm, agent, *after) == {CUSTOMER_HZ}

    leg = sup["supervision_id"] and got["supervision"]["supervisor_leg_id"]
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 3, 10), dump(rec.events)
    await asyncio.sleep(0.3)
    kinds = [e.kind for e in rec.events if e.kind.startswith("call.supervision.")]
    assert kinds == ["call.supervision.started", "call.supervision.mode_changed",
                     "call.supervision.mode_changed", "call.supervision.ended"], kinds
    started = next(e for e in rec.events if e.kind == "call.supervision.started").body["data"]
    assert started["call_id"] == call_id and started["mode"] == "listen", started
    assert started["supervisor"] == {"type": "phone", "number": SUPERVISOR}, started
    assert started["label"] == "qa" and started["supervisor_leg_id"] == leg, started
    changes = [e.body["data"] for e in rec.events if e.kind == "call.supervision.mode_changed"]
    assert [(c["previous_mode"], c["mode"]) for c in changes] == [("listen", "whisper"),
                                                                  ("whisper", "barge")]
    sup_final = final_events(rec.events, leg)
    assert len(sup_final) == 1, dump(rec.events)
    data = sup_final[0].body["data"]
    assert data["parent_call_id"] == call_id and data["direction"] == "outbound", data
    assert data["to"] == SUPERVISOR and data["status"] == "completed", data


async def test_unbridged_and_busy_supervisors_fail_cleanly(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm = await phone_farm(behaviours=BEHAVIOURS, tone=CUSTOMER_HZ)
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url, extra=trunk(farm))

    def script(req: Any, form: dict[str, str]) -> Any:
        if form.get("from") == "+254733000010":  # not bridged: a pause
            return {"actions": [{"pause": {"length": 6}}]}
        if "DialCallStatus" in form:
            return {"actions": [{"hangup": {}}]}
        return {"actions": [{"dial": {"number": AGENT}}]}

    voice_app.script = script
    alone = await farm.call(gw.uri, CUSTOMER_HZ, from_user="+254733000010")
    await farm.wait(alone, "answered", 10)
    alone_id = str(voice_app.requests[0]["form"]["callId"])
    body = {"mode": "listen", "supervisor": {"type": "phone", "number": BUSY_SUP}}
    async with aiohttp.ClientSession() as http:
        status, err = await api(http, gw, "POST", f"/v1/calls/{alone_id}/supervision", json=body)
        assert status == 409 and err["error"]["code"] == "calls.not_bridged", err
        await farm.hangup(alone)
        customer = await farm.call(gw.uri, CUSTOMER_HZ, from_user="+254733000011")
        agent = (await farm.incoming(user=AGENT, nth=0))["id"]
        await farm.wait(agent, "answered", 10)
        call_id = str(voice_app.requests[-1]["form"]["callId"])
        status, sup = await api(http, gw, "POST", f"/v1/calls/{call_id}/supervision", json=body)
        assert status == 201, sup
        for _ in range(50):
            _, got = await api(http, gw, "GET", f"/v1/calls/{call_id}/supervision")
            if got["supervision"]["state"] == "failed":
                break
            await asyncio.sleep(0.1)
        assert got["supervision"]["state"] == "failed" and got["supervision"]["reason"] == "busy"
        await farm.hangup(customer)
        await farm.wait(agent, "disconnected", 10)
    assert await rec.wait_for(
        lambda evs: any(e.kind == "call.supervision.failed" for e in evs), 10), dump(rec.events)
    assert not any(e.kind == "call.supervision.started" for e in rec.events)
