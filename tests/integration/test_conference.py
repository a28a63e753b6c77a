"""Conference rooms on a node of several workers behind a real Kamailio, measured on audio.

Every caller is a phone of a phone farm (tests/integration/tonephones.py) sending its own tone
and recording what it receives; who hears whom is the Goertzel levels of those recordings
(tests/tones.py), never the API's view. Workers take 2 calls each, so a room of 5 spans 3
workers (media crosses them through the room's media links to its hub)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.demo import free_port_block
from media.tones import BEEP_HZ, HOLD
from tests import tones
from tests.integration.conftest import NUMBER
from tests.integration.tonephones import PhoneFarm, phone_farm  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer test-token"}
TONES = (697, 770, 852, 941, 1209)
WAIT_HZ, AFTER_HZ = 1336, 1477  # the waitUrl document's tone; the tone played after the room
HOLD_HZ = HOLD[0][0]  # the hold tone's first note
SETTLE_S = 0.5  # edges take effect on the next tick; links, RTP and recorders lag a little


def conference_gateway(gateway_factory: Any, voice_app: Any, events_url: str,
                       *, workers: int = 3) -> Any:
    base = free_port_block(workers)
    return gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url,
        workers=f"count = {workers}\ncalls_per_worker = 2\nreserved_slots = 0\n"
                f"sip_port_start = {base}",
        kamailio='mode = "managed"\nping_interval_s = 1\n')


def serve_tones(voice_app: Any, tmp: Path) -> None:
    """The voice app serves /tone-<hz>.wav (4 s sines) besides its documents."""
    for hz in (WAIT_HZ, AFTER_HZ):
        tones.write_wav(tmp / f"tone-{hz}.wav", tones.sine(hz, 4.0, 8000, 0.4), 8000)
    script = voice_app.script

    def route(req: web.Request, form: dict[str, str]) -> Any:
        if req.path.startswith("/tone-"):
            return web.FileResponse(tmp / req.path.lstrip("/"))
        return script(req, form)

    voice_app.script = route


def tone_url(voice_app: Any, hz: int) -> str:
    return f"{voice_app.base_url}/tone-{hz}.wav"


async def api(gw: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"http://127.0.0.1:{gw.api_port}{path}", json=body,
                                headers=AUTH) as r:
            return r.status, await r.json()


async def until(pred: Any, timeout: float = 10.0, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


async def room(gw: Any, name: str) -> dict[str, Any] | None:
    status, body = await api(gw, "GET", f"/v1/conferences/{name}")
    return body["conference"] if status == 200 else None


async def room_of(gw: Any, name: str, count: int) -> dict[str, Any]:
    async def full() -> dict[str, Any] | None:
        r = await room(gw, name)
        return r if r is not None and r["participant_count"] == count else None

    result: dict[str, Any] = await until(full, 15)
    return result


class Phones:
    """Callers spread over farms (4 calls a farm); each call's tone and recording."""

    def __init__(self, farms: list[PhoneFarm]) -> None:
        self.farms = farms
        self.calls: dict[int, tuple[PhoneFarm, str]] = {}  # tone -> (farm, farm call id)
        self.gateway_ids: dict[int, str] = {}  # tone -> the gateway's call_id

    async def call(self, gw: Any, hz: int) -> str:
        farm = self.farms[len(self.calls) // 3]
        cid = await farm.call(f"sip:{NUMBER}@127.0.0.1:{gw.sip_port}", hz,
                              from_user=caller(hz))
        self.calls[hz] = (farm, cid)
        await farm.wait(cid, "answered", 10)
        return cid

    def heard(self, hz: int, t0: float, t1: float,
              freqs: tuple[int, ...] = TONES) -> tuple[set[float], dict[float, float]]:
        farm, cid = self.calls[hz]
        x, rate = farm.recording(cid)
        a, b = farm.offset(cid, t0) + SETTLE_S, farm.offset(cid, t1)
        assert b - a > 0.5 and len(x) >= (b - 0.1) * rate, (hz, a, b, len(x) / rate)
        return (tones.heard(x, rate, freqs, a, b),
                {f: round(v, 1) for f, v in tones.levels(x, rate, freqs, a, b).items()})

    async def hangup(self, hz: int) -> None:
        farm, cid = self.calls[hz]
        await farm.hangup(cid)


def caller(hz: int) -> str:
    return f"+25471100{hz:04d}"


def tone_of(form: dict[str, str]) -> int:
    return int(form["from"][-4:])


async def window(seconds: float) -> tuple[float, float]:
    t0 = time.time()
    await asyncio.sleep(seconds)
    t1 = time.time()
    await asyncio.sleep(0.4)  # the phones' recorders write behind
    return t0, t1


@pytest.fixture
async def farms(phone_farm: Any) -> list[PhoneFarm]:  # noqa: F811
    return list(await asyncio.gather(phone_farm(), phone_farm()))


async def test_five_on_three_workers_each_hears_the_other_four(
        voice_app, receiver, gateway_factory, farms):
    _, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"conference": {"name": "five"}}]}
    gw = conference_gateway(gateway_factory, voice_app, events_url)
    phones = Phones(farms)
    for hz in TONES:
        await phones.call(gw, hz)
    r = await room_of(gw, "five", 5)
    assert len(r["workers"]) == 3, r
    t = await window(2.0)
    for hz in TONES:
        got, lv = phones.heard(hz, *t)
        assert got == set(TONES) - {hz}, (hz, lv)


async def test_mute_and_kick_live(voice_app, receiver, gateway_factory, farms, tmp_path):
    _, events_url = receiver
    a, b, c = TONES[:3]
    voice_app.script = lambda req, form: {"actions": [
        {"conference": {"name": "ctl"}},
        {"play": {"url": tone_url(voice_app, AFTER_HZ)}},
        {"pause": {"length": 5}},
    ]}
    serve_tones(voice_app, tmp_path)
    gw = conference_gateway(gateway_factory, voice_app, events_url, workers=2)
    phones = Phones(farms)
    for hz in (a, b, c):
        phones.gateway_ids[hz] = (await phones.call(gw, hz))
    r = await room_of(gw, "ctl", 3)
    assert len(r["workers"]) == 2, r
    ids = {tone_of_call(voice_app, p["call_id"]): p["call_id"] for p in r["participants"]}
    t_all = await window(1.2)

    status, body = await api(gw, "POST", f"/v1/conferences/ctl/participants/{ids[a]}",
                             {"muted": True})
    assert status == 200 and body["participant"]["muted"] is True, body
    t_muted = await window(1.2)
    r = await room(gw, "ctl")
    assert r is not None and [p["muted"] for p in r["participants"]
                              if p["call_id"] == ids[a]] == [True]

    status, body = await api(gw, "POST", f"/v1/conferences/ctl/participants/{ids[b]}",
                             {"hold": True})
    assert status == 200 and body["participant"]["hold"] is True, body
    t_held = await window(1.2)
    status, body = await api(gw, "POST", f"/v1/conferences/ctl/participants/{ids[b]}",
                             {"hold": False})
    assert status == 200, body

    status, body = await api(gw, "DELETE", f"/v1/conferences/ctl/participants/{ids[c]}")
    assert status == 200, body
    t_kicked = await window(1.5)

    everyone = (a, b, c, AFTER_HZ)
    for hz in (a, b, c):
        got, lv = phones.heard(hz, *t_all, everyone)
        assert got == {a, b, c} - {hz}, ("all", hz, lv)
    assert phones.heard(a, *t_muted, everyone)[0] == {b, c}, "muted: still hears"
    assert phones.heard(b, *t_muted, everyone)[0] == {c}, "muted: a is not heard"
    assert phones.heard(c, *t_muted, everyone)[0] == {b}, "muted: a is not heard"
    # held: b hears the hold tone only (no member) and is not heard; a is still muted
    assert phones.heard(b, *t_held, everyone)[0] == set(), "held: hears nobody"
    farm, cid = phones.calls[b]
    x, rate = farm.recording(cid)
    held_from = farm.offset(cid, t_held[0])
    span = x[int(held_from * rate):int(farm.offset(cid, t_held[1]) * rate)]
    assert max(tones.block_levels(span, rate, HOLD_HZ)) > tones.HEARD_DBFS, "the hold tone"
    before = x[int(farm.offset(cid, t_muted[0]) * rate):int(held_from * rate)]
    assert max(tones.block_levels(before, rate, HOLD_HZ)) < tones.HEARD_DBFS, "only then"
    assert phones.heard(a, *t_held, everyone)[0] == {c}, "held: b is not heard"
    assert phones.heard(c, *t_held, everyone)[0] == set(), "a muted, b held"
    # kicked: c's document goes on (its next action plays AFTER_HZ), out of the room
    assert phones.heard(c, *t_kicked, everyone)[0] == {AFTER_HZ}
    assert phones.heard(b, *t_kicked, everyone)[0] == set(), "a muted, c gone"
    assert phones.heard(a, *t_kicked, everyone)[0] == {b}
    r = await room(gw, "ctl")
    assert r is not None and r["participant_count"] == 2
    status, body = await api(gw, "DELETE", "/v1/conferences/ctl/participants/nobody")
    assert status == 404 and body["error"]["code"] == "conferences.participant_not_found"


def tone_of_call(voice_app: Any, call_id: str) -> int:
    form = next(r["form"] for r in voice_app.requests if r["form"].get("callId") == call_id)
    return tone_of(form)


async def test_start_on_enter_wait_url_and_end_on_exit(
        voice_app, receiver, gateway_factory, farms, tmp_path):
    """a (waitUrl: a tone WAV) and b (the hold tone) wait, alone, hearing nobody; c enters with
    startOnEnter and endOnExit: all hear each other; c leaves: the room ends for a and b,
    whose documents go on."""
    _, events_url = receiver
    a, b, c = TONES[:3]

    def script(req: web.Request, form: dict[str, str]) -> Any:
        if req.path == "/wait":
            return {"actions": [{"play": {"url": tone_url(voice_app, WAIT_HZ)}}]}
        hz = tone_of(form)
        conf: dict[str, Any] = {"name": "soe", "startOnEnter": hz == c, "endOnExit": hz == c,
                                "beep": hz == c}
        if hz == a:
            conf["waitUrl"] = f"{voice_app.base_url}/wait"
        return {"actions": [{"conference": conf},
                            {"play": {"url": tone_url(voice_app, AFTER_HZ)}},
                            {"pause": {"length": 5}}]}

    voice_app.script = script
    serve_tones(voice_app, tmp_path)
    gw = conference_gateway(gateway_factory, voice_app, events_url, workers=2)
    phones = Phones(farms)
    await phones.call(gw, a)
    await room_of(gw, "soe", 1)
    t_alone = await window(1.5)
    await phones.call(gw, b)
    r = await room_of(gw, "soe", 2)
    assert r["started"] is False
    t_waiting = await window(1.2)
    t_c = time.time()
    await phones.call(gw, c)
    r = await room_of(gw, "soe", 3)
    assert r["started"] is True
    t_started = await window(1.2)
    await phones.hangup(c)
    await until(lambda: _gone(gw, "soe"), 10)
    t_ended = await window(1.2)

    freqs = (a, b, c, WAIT_HZ, AFTER_HZ)
    assert phones.heard(a, *t_alone, freqs)[0] == {WAIT_HZ}, "waitUrl heard while alone"
    assert phones.heard(a, *t_waiting, freqs)[0] == {WAIT_HZ}, "waiting: not mixed"
    assert phones.heard(b, *t_waiting, freqs)[0] == set(), "waiting: hold tone only"
    got_a, lv = phones.heard(a, *t_started, freqs)
    assert got_a == {b, c}, ("started: the wait music stops", lv)
    assert phones.heard(b, *t_started, freqs)[0] == {a, c}
    assert phones.heard(c, *t_started, freqs)[0] == {a, b}
    # c has `beep`: its entry beeps to the others (each worker beeps its own members)
    for hz in (a, b):
        farm, cid = phones.calls[hz]
        x, rate = farm.recording(cid)
        at = tones.onset(x, rate, BEEP_HZ, after_s=farm.offset(cid, t_c))
        assert at is not None and at < farm.offset(cid, t_started[0]) + 0.5, (hz, at)
    # endOnExit: the room ended for a and b; their documents go on with the next action
    assert phones.heard(a, *t_ended, freqs)[0] == {AFTER_HZ}
    assert phones.heard(b, *t_ended, freqs)[0] == {AFTER_HZ}


async def _gone(gw: Any, name: str) -> bool:
    return await room(gw, name) is None


async def test_full_room_status_events_digits_and_record(
        voice_app, receiver, gateway_factory, farms, tmp_path):
    """a is in the room (status events, digits, recording); b's join beyond maxParticipants
    is refused: b hears the message, then its next action; a never hears b."""
    rec, events_url = receiver
    a, b = TONES[:2]

    def script(req: web.Request, form: dict[str, str]) -> Any:
        if req.path in ("/status", "/digits"):
            return web.Response(status=204)
        hz = tone_of(form)
        conf: dict[str, Any] = {"name": "small", "maxParticipants": 1}
        if hz == a:
            conf |= {"statusEventsCallbackUrl": f"{voice_app.base_url}/status",
                     "statusEvents": "start join leave end", "collectDigits": True,
                     "finishOnKey": "#", "digitsCallbackUrl": f"{voice_app.base_url}/digits",
                     "record": True, "beep": True}
        return {"actions": [{"conference": conf},
                            {"play": {"url": tone_url(voice_app, AFTER_HZ)}},
                            {"pause": {"length": 5}}]}

    voice_app.script = script
    serve_tones(voice_app, tmp_path)
    gw = conference_gateway(gateway_factory, voice_app, events_url, workers=2)
    phones = Phones(farms)
    a_id = await phones.call(gw, a)
    await room_of(gw, "small", 1)
    await phones.call(gw, b)
    t_refused = await window(3.0)  # the message (~1.5 s) then the tone
    r = await room(gw, "small")
    assert r is not None and r["participant_count"] == 1
    assert r["recording"] is True and r["participants"][0]["recording"] is True
    farm_a = phones.calls[a][0]
    await farm_a.send_dtmf(a_id, "42#")
    await until(lambda: _posted(voice_app, "/digits"), 5)
    status, body = await api(gw, "DELETE", "/v1/conferences/small")
    assert status == 200 and body["participants"] == 1, body
    await until(lambda: _posted(voice_app, "/status", 4), 5)

    freqs = (a, b, AFTER_HZ)
    assert AFTER_HZ in phones.heard(b, t_refused[0] + 1.8, t_refused[1], freqs)[0]
    assert b not in phones.heard(a, *t_refused, freqs)[0]
    digits = [r["form"] for r in voice_app.requests if r["path"] == "/digits"]
    assert [d["Digits"] for d in digits] == ["42"] and digits[0]["ConferenceName"] == "small"
    status_posts = [r for r in voice_app.requests if r["path"] == "/status"]
    assert all(p["signature_ok"] for p in status_posts)
    events = [p["form"]["StatusEvent"] for p in status_posts]
    assert events[:2] == ["join", "start"] or events[:2] == ["start", "join"], events
    assert events[-2:] == ["leave", "end"], events
    assert status_posts[0]["form"]["ParticipantCallId"] in ("", tone_of_call_id(voice_app, a))
    assert await rec.wait_for(
        lambda evs: any(e.kind == "call.recording.ready" for e in evs), 10)


async def _posted(voice_app: Any, path: str, n: int = 1) -> bool:
    return sum(1 for r in voice_app.requests if r["path"] == path) >= n


def tone_of_call_id(voice_app: Any, hz: int) -> str:
    return next(r["form"]["callId"] for r in voice_app.requests
                if r["form"].get("from") == caller(hz) and r["path"] == "/voice")


async def test_hub_worker_killed_the_room_goes_on(voice_app, receiver, gateway_factory, farms):
    """Three callers on three workers; the hub's worker is killed: its caller gets its final
    (worker_lost), the other two are re-homed on a new hub and still hear each other."""
    import os
    import signal

    from tests.integration.conftest import final_events, worker_pids

    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"conference": {"name": "rehome"}}]}
    base = free_port_block(3)
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url,
        workers=f"count = 3\ncalls_per_worker = 1\nreserved_slots = 0\nsip_port_start = {base}",
        kamailio='mode = "managed"\nping_interval_s = 1\n')
    a, b, c = TONES[:3]
    phones = Phones(farms)
    for hz in (a, b, c):
        await phones.call(gw, hz)
    r = await room_of(gw, "rehome", 3)
    assert len(r["workers"]) == 3, r
    hub = r["hub_worker"]
    victim = next(p for p in r["participants"] if p["worker"] == hub)
    t_all = await window(1.0)
    os.kill(worker_pids(gw)[hub], signal.SIGKILL)
    r = await room_of(gw, "rehome", 2)
    assert r["hub_worker"] != hub, r
    await asyncio.sleep(0.5)
    t_after = await window(1.2)

    survivors = [hz for hz in (a, b, c)
                 if tone_of_call(voice_app, victim["call_id"]) != hz]
    for hz in (a, b, c):
        assert phones.heard(hz, *t_all)[0] == {a, b, c} - {hz}
    x, y = survivors
    assert phones.heard(x, *t_after)[0] == {y}
    assert phones.heard(y, *t_after)[0] == {x}
    assert await rec.wait_for(
        lambda evs: any(e.body["data"]["call_id"] == victim["call_id"]
                        for e in final_events(evs)), 10)
    lost = final_events(rec.events, victim["call_id"])
    assert [e.kind for e in lost] == ["call.failed"]
    assert lost[0].body["data"]["reason"] == "worker_lost"
