"""`dial` end to end on one worker: a phone farm caller (inbound) is bridged to phone farm
callees through a `[[trunks]]` entry; who hears whom is measured on the phones' own tones.
Cross-worker bridges and a lost worker: test_dial_workers.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests import tones
from tests.integration.conftest import NUMBER, dump, final_events
from tests.integration.tonephones import FarmFactory, PhoneFarm, phone_farm  # noqa: F401

pytestmark = pytest.mark.integration

CALLER_HZ, CALLEE_HZ = 697, 941
ANSWERS, BUSY, RINGS, ANSWERS_LATE = "+254711000002", "+254711000003", "+254711000004", \
    "+254711000005"
BEHAVIOURS = {
    ANSWERS: {"do": "answer", "tone": CALLEE_HZ, "after": 1.0, "hangup_after": 3.0},
    BUSY: {"do": "busy"},
    RINGS: {"do": "ring"},
    ANSWERS_LATE: {"do": "answer", "tone": 1209, "after": 1.0, "hangup_after": 1.5},
}


def trunk(farm: PhoneFarm) -> str:
    return f'[[trunks]]\nname = "farm"\naddress = "{farm.host_port}"\nmax_cps = 200\n'


def dial_app(voice_app: Any, dial: dict[str, Any]) -> None:
    """The first request dials; the one after the dial (it carries DialCallStatus) hangs up."""
    def script(req: Any, form: dict[str, str]) -> Any:
        if "DialCallStatus" in form:
            return {"actions": [{"hangup": {}}]}
        return {"actions": [{"dial": dial}]}
    voice_app.script = script


def dial_requests(voice_app: Any) -> list[dict[str, str]]:
    return [r["form"] for r in voice_app.requests if "DialCallStatus" in r["form"]]


def form_parent(voice_app: Any) -> str:
    return str(voice_app.requests[0]["form"]["callId"])


def of_call(events: list[Any], call_id: str) -> list[Any]:
    return [e for e in events if e.body["data"].get("call_id") == call_id]


def children(events: list[Any], parent: str) -> list[str]:
    ids = [e.body["data"]["call_id"] for e in events
           if e.kind == "call.started" and e.body["data"].get("parent_call_id") == parent]
    return list(dict.fromkeys(ids))


async def one_worker(phone_farm: FarmFactory, gateway_factory: Any, voice_app: Any,  # noqa: F811
                     events_url: str) -> tuple[PhoneFarm, Any]:
    farm = await phone_farm(behaviours=BEHAVIOURS, tone=CALLER_HZ)
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url, extra=trunk(farm))
    return farm, gw


async def test_dial_bridges_both_ways_within_one_worker(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm, gw = await one_worker(phone_farm, gateway_factory, voice_app, events_url)
    dial_app(voice_app, {"number": ANSWERS})
    caller = await farm.call(gw.uri, CALLER_HZ, from_user="+254733000001")
    await farm.wait(caller, "answered")
    callee = (await farm.incoming(user=ANSWERS))["id"]
    t_ring = time.time()
    await farm.wait(callee, "answered")
    t_bridged = time.time()
    await farm.wait(callee, "disconnected", 10)  # the callee hangs up after 3 s
    await farm.wait(caller, "disconnected", 10)  # the document goes on: hangup

    x, rate = farm.recording(caller)
    r0, r1 = farm.offset(caller, t_ring), farm.offset(caller, t_bridged) - 0.1
    ringing = x[int(r0 * rate):int(r1 * rate)]
    ringback = max(tones.block_levels(ringing, rate, 400))  # 400+450 Hz, 0.4 s bursts
    assert ringback > -40 and not tones.hears(ringing, rate, CALLEE_HZ), ringback
    a, b = farm.offset(caller, t_bridged) + 0.4, farm.offset(caller, t_bridged) + 2.5
    assert tones.heard(x, rate, start_s=a, end_s=b) == {CALLEE_HZ}, tones.levels(x, rate,
                                                                                start_s=a, end_s=b)
    y, rate = farm.recording(callee)
    assert tones.heard(y, rate, start_s=0.4, end_s=2.5) == {CALLER_HZ}, tones.levels(y, rate)

    form = dial_requests(voice_app)[0]
    assert form["DialCallStatus"] == "completed" and form["DialSipStatus"] == "200", form
    assert 2 <= int(form["DialCallDuration"]) <= 5, form
    leg = form["DialCallSid"]
    parent = form["callId"]
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 2, 10), dump(rec.events)
    await asyncio.sleep(0.3)
    kinds = [e.kind for e in of_call(rec.events, leg)]
    assert kinds == ["call.started", "call.answered", "call.completed"], dump(rec.events)
    final = final_events(rec.events, leg)[0].body["data"]
    assert final["parent_call_id"] == parent and final["direction"] == "outbound"
    assert final["status"] == "completed" and final["to"] == ANSWERS, final
    assert final["from"] == NUMBER, final  # callerId default: the number the caller dialled
    assert [e.body["data"]["status"] for e in final_events(rec.events, parent)] == ["completed"]


async def test_busy_and_no_answer_reach_the_voice_app(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm, gw = await one_worker(phone_farm, gateway_factory, voice_app, events_url)

    def script(req: Any, form: dict[str, str]) -> Any:
        if "DialCallStatus" in form:
            return {"actions": [{"hangup": {}}]}
        who = BUSY if form["from"] == "+254733000001" else RINGS
        return {"actions": [{"dial": {"number": who, "timeout": 1.5}}]}

    voice_app.script = script
    # One after the other: a farm holds 4 calls, and refuses a 4th INVITE while 3 are up.
    c1 = await farm.call(gw.uri, CALLER_HZ, from_user="+254733000001")
    await farm.wait(c1, "disconnected", 15)
    c2 = await farm.call(gw.uri, 770, from_user="+254733000002")
    await farm.wait(c2, "disconnected", 15)
    by_from = {f["from"]: f for f in dial_requests(voice_app)}
    busy, none = by_from["+254733000001"], by_from["+254733000002"]
    assert busy["DialCallStatus"] == "busy" and busy["DialSipStatus"] == "486", busy
    assert none["DialCallStatus"] == "no-answer" and none["DialCallDuration"] == "0", none
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 4, 10), dump(rec.events)
    f1 = final_events(rec.events, busy["DialCallSid"])[0].body["data"]
    f2 = final_events(rec.events, none["DialCallSid"])[0].body["data"]
    assert (f1["status"], f1["parent_call_id"]) == ("busy", busy["callId"]), f1
    assert (f2["status"], f2["reason"], f2["direction"]) == ("no_answer", "ring_timeout",
                                                             "outbound"), f2


async def test_numbers_ring_at_once_the_second_answers_the_first_is_canceled(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm, gw = await one_worker(phone_farm, gateway_factory, voice_app, events_url)
    dial_app(voice_app, {"numbers": [RINGS, ANSWERS_LATE]})
    caller = await farm.call(gw.uri, CALLER_HZ, from_user="+254733000001")
    ringing = (await farm.incoming(user=RINGS))["id"]
    late = (await farm.incoming(user=ANSWERS_LATE))["id"]
    await farm.wait(late, "answered")
    first_end = await farm.wait(ringing, "disconnected", 5)  # CANCELed when the other answered
    assert first_end["code"] == 487, first_end
    await farm.wait(caller, "disconnected", 10)
    form = dial_requests(voice_app)[0]
    assert form["DialCallStatus"] == "completed", form
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 3, 10), dump(rec.events)
    legs = children(rec.events, form["callId"])
    assert len(legs) == 2 and form["DialCallSid"] in legs, dump(rec.events)
    loser = next(c for c in legs if c != form["DialCallSid"])
    finals = {c: [e.body["data"] for e in final_events(rec.events, c)] for c in legs}
    assert [f["status"] for f in finals[loser]] == ["canceled"], finals
    assert finals[loser][0]["reason"] == "dial_lost_race", finals
    assert [f["status"] for f in finals[form["DialCallSid"]]] == ["completed"], finals


@pytest.mark.parametrize("by", ["caller", "api"])
async def test_caller_hanging_up_mid_ring_cancels_the_leg(
    by, phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    from tests.integration.test_outbound import api

    rec, events_url = receiver
    farm, gw = await one_worker(phone_farm, gateway_factory, voice_app, events_url)
    dial_app(voice_app, {"number": RINGS})
    caller = await farm.call(gw.uri, CALLER_HZ, from_user="+254733000001")
    leg = (await farm.incoming(user=RINGS))["id"]
    await asyncio.sleep(0.5)
    if by == "caller":
        await farm.hangup(caller)
    else:  # the API ends the caller's call: the dial stops with it
        status, body = await api(gw, "POST", f"/v1/calls/{form_parent(voice_app)}/hangup")
        assert status == 200, body
    end = await farm.wait(leg, "disconnected", 5)
    assert end["code"] == 487, end
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 2, 10), dump(rec.events)
    await asyncio.sleep(0.3)
    assert not dial_requests(voice_app), "no callback after the caller hung up"
    finals = [e.body["data"] for e in final_events(rec.events)]
    assert len(finals) == 2, dump(rec.events)
    child = next(f for f in finals if f.get("parent_call_id"))
    parent = next(f for f in finals if not f.get("parent_call_id"))
    assert (child["status"], child["reason"]) == ("canceled", "dial_parent_hangup"), child
    assert child["parent_call_id"] == parent["call_id"] and parent["status"] == "completed"


async def test_early_media_replaces_ringback_and_the_bridge_is_recorded(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    """A callee that sends 183 with media is heard before it answers (no ringback then);
    record-from-answer writes one file with both parties, `call.recording.ready` on the
    caller's call."""
    rec, events_url = receiver
    farm, gw = await one_worker(phone_farm, gateway_factory, voice_app, events_url)
    dial_app(voice_app, {"sip": farm.uri("early-1209-1.5"), "record": "record-from-answer",
                         "timeLimit": 2.5})
    caller = await farm.call(gw.uri, CALLER_HZ, from_user="+254733000001")
    callee = (await farm.incoming(user="early-1209-1.5"))["id"]
    t_early = time.time()
    await farm.wait(callee, "answered")
    t_answer = time.time()
    end = await farm.wait(callee, "disconnected", 10)  # the time limit: the gateway's BYE
    assert end["by"] == "remote", end
    await farm.wait(caller, "disconnected", 10)
    x, rate = farm.recording(caller)
    e0, e1 = farm.offset(caller, t_early) + 0.3, farm.offset(caller, t_answer) - 0.1
    early = x[int(e0 * rate):int(e1 * rate)]
    assert tones.hears(early, rate, 1209), tones.levels(early, rate)
    assert max(tones.block_levels(early, rate, 400)) < -40  # no ringback over early media

    form = dial_requests(voice_app)[0]
    assert form["DialCallStatus"] == "completed" and form["DialCallDuration"] in ("3", "4")
    assert await rec.wait_for(
        lambda evs: any(e.kind == "call.recording.ready" for e in evs), 10), dump(rec.events)
    ready = next(e for e in rec.events if e.kind == "call.recording.ready").body["data"]
    assert ready["call_id"] == form["callId"] and 2.0 <= ready["duration_seconds"] <= 3.5
    wav = gw.storage / "recordings" / f"{ready['recording_id']}.wav"
    y, rate = tones.read_wav(wav)
    assert tones.heard(y, rate, start_s=0.4, end_s=2.2) == {CALLER_HZ, 1209}, tones.levels(y, rate)


async def test_sequential_numbers_try_the_next_after_a_busy_one(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm, gw = await one_worker(phone_farm, gateway_factory, voice_app, events_url)
    dial_app(voice_app, {"numbers": [BUSY, ANSWERS_LATE], "sequential": True,
                         "record": "record-from-ringing"})
    caller = await farm.call(gw.uri, CALLER_HZ, from_user="+254733000001")
    await farm.wait(caller, "disconnected", 15)
    busy = await farm.incoming(user=BUSY)
    late = await farm.incoming(user=ANSWERS_LATE)
    assert farm.events.index(busy) < farm.events.index(late)
    form = dial_requests(voice_app)[0]
    assert form["DialCallStatus"] == "completed", form
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 3, 10), dump(rec.events)
    legs = children(rec.events, form["callId"])
    statuses = [final_events(rec.events, c)[0].body["data"]["status"] for c in legs]
    assert statuses == ["busy", "completed"] and legs[1] == form["DialCallSid"], statuses
    # record-from-ringing: from the dial's start (ringback), through the answer (1 s later)
    assert await rec.wait_for(
        lambda evs: any(e.kind == "call.recording.ready" for e in evs), 10), dump(rec.events)
    ready = next(e for e in rec.events if e.kind == "call.recording.ready").body["data"]
    assert ready["duration_seconds"] >= 2.2, ready
    y, rate = tones.read_wav(gw.storage / "recordings" / f"{ready['recording_id']}.wav")
    assert max(tones.block_levels(y[:int(0.9 * rate)], rate, 400)) > -40  # the ringback
    assert tones.heard(y, rate, start_s=1.5, end_s=2.3) == {CALLER_HZ, 1209}


async def test_a_child_leg_is_a_call_the_api_can_hang_up(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    from tests.integration.test_outbound import api

    rec, events_url = receiver
    farm, gw = await one_worker(phone_farm, gateway_factory, voice_app, events_url)
    dial_app(voice_app, {"number": RINGS})
    caller = await farm.call(gw.uri, CALLER_HZ, from_user="+254733000001")
    callee = (await farm.incoming(user=RINGS))["id"]
    assert await rec.wait_for(lambda evs: any(e.body["data"].get("parent_call_id")
                                              for e in evs), 10), dump(rec.events)
    leg = next(e.body["data"]["call_id"] for e in rec.events
               if e.body["data"].get("parent_call_id"))
    status, body = await api(gw, "GET", f"/v1/calls/{leg}")
    assert status == 200, body
    assert (body["call"]["status"], body["call"]["parent_call_id"]) == ("ringing", form_parent(
        voice_app)), body
    status, body = await api(gw, "POST", f"/v1/calls/{leg}/hangup")
    assert status == 200, body
    assert (await farm.wait(callee, "disconnected", 5))["code"] == 487
    await farm.wait(caller, "disconnected", 10)  # the dial is over: the app hangs up
    form = dial_requests(voice_app)[0]
    assert (form["DialCallStatus"], form["DialCallSid"]) == ("canceled", leg), form
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 2, 10), dump(rec.events)
    final = final_events(rec.events, leg)[0].body["data"]
    assert (final["status"], final["reason"]) == ("canceled", "api_hangup"), final


async def test_the_caller_hanging_up_ends_the_bridge_both_complete(
    phone_farm, gateway_factory, voice_app, receiver  # noqa: F811
):
    rec, events_url = receiver
    farm, gw = await one_worker(phone_farm, gateway_factory, voice_app, events_url)
    dial_app(voice_app, {"sip": farm.uri("answer-1336")})
    caller = await farm.call(gw.uri, CALLER_HZ, from_user="+254733000001")
    callee = (await farm.incoming(user="answer-1336"))["id"]
    await farm.wait(callee, "answered")
    await asyncio.sleep(1.0)
    await farm.hangup(caller)
    end = await farm.wait(callee, "disconnected", 5)
    assert end["by"] == "remote", end  # the gateway's BYE
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 2, 10), dump(rec.events)
    await asyncio.sleep(0.3)
    assert not dial_requests(voice_app)
    finals = {f["call_id"]: f for f in (e.body["data"] for e in final_events(rec.events))}
    assert len(finals) == 2 and {f["status"] for f in finals.values()} == {"completed"}, finals
    child = next(f for f in finals.values() if f.get("parent_call_id"))
    assert child["to"] == farm.uri("answer-1336") and child["duration_seconds"] >= 1, child
