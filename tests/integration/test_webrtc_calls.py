"""Browser calls end to end on real parts: headless Chromium running the gateway's own phone
page (JsSIP over Kamailio's websocket, DTLS-SRTP/ICE through rtpengine to the workers' plain
RTP), its fake microphone playing a known tone. Who hears whom is measured with tones: the
page's capture of the remote track, the gateway's recording, a pjsua2 phone's recording."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests import tones
from tests.integration.browser import BrowserPhone, tone_wav
from tests.integration.conftest import NUMBER, dump, final_events
from tests.integration.test_record import fetch_recording
from tests.integration.tonephones import FarmFactory, phone_farm  # noqa: F401
from tests.integration.webrtc import (
    FRONT,
    KEY_OLD,
    KEY_REMOVED,
    token,
    tone_wav_bytes,
    two_workers,
    webrtc_section,
)

pytestmark = [pytest.mark.integration, pytest.mark.browser]

BROWSER_HZ, GATEWAY_HZ, PHONE_HZ = 852, 1209, 697
DEMO_CHIME_HZ = 1318.5
UNKNOWN = "+254700000999"  # not a [[numbers]] entry: the demo voice app answers it
OUTSIDE = "+254711000999"  # not the gateway's: without the demo, the client's number's app


def tone_file(voice_app: Any, freq: float, seconds: float) -> str:
    """A URL on the voice app serving a WAV of `freq`."""
    return f"{voice_app.base_url}/tone/{freq}/{seconds}.wav"


async def start(gateway_factory: Any, voice_app: Any, events_url: str | None, *,
                demo: bool = False, extra: str = "", workers: str | None = None
                ) -> tuple[Any, str]:
    section, ws_port = webrtc_section()
    if demo:
        section += "[demo]\nenabled = true\n"
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url, extra=section + extra,
                         workers=workers or two_workers(), kamailio=FRONT)
    return gw, f"ws://127.0.0.1:{ws_port}/"


async def closing_count(gw: Any) -> int:
    """BYEs the front still counts as holding a worker's slot (its `closing` htable)."""
    from gateway.kamailio import rpc_call

    result = await rpc_call(gw.storage / "kamailio" / "rpc.sock", "htable.dump", "closing")
    return sum(int(item.get("value") or 0) for slot in (result or [])
               for item in (slot.get("slot") or []) if isinstance(item, dict))


async def slots_given_back(gw: Any) -> None:
    for _ in range(40):
        if await closing_count(gw) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the front still counts {await closing_count(gw)} closing BYE(s)")


async def mint(gw: Any, name: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(
        f"http://127.0.0.1:{gw.api_port}/v1/webrtc/token",
        json={"client_name": name, "phone_number": NUMBER},
        headers={"Authorization": "Bearer test-token"},
    ) as r:
        assert r.status == 201, await r.text()
        return dict(await r.json())


async def open_phone(gw: Any, tmp_path: Path, name: str, mic_hz: float) -> BrowserPhone:
    mic = tone_wav(tmp_path / f"mic-{name}.wav", mic_hz)
    phone = await BrowserPhone.launch(mic, tmp_path / f"browser-{name}.log")
    try:
        await phone.goto(f"http://127.0.0.1:{gw.api_port}/demo/phone")
        minted = await mint(gw, name)
        opts = {"token": minted["token"], "endpoint": minted["endpoint"],
                "uri": minted["sipProfile"]["uri"], "displayName": name}
        reg = await phone.eval(f"sautiPhone.register({json.dumps(opts)})")
        assert reg["ok"] and reg["code"] == 200, (reg, gw.log_text()[-3000:])
    except BaseException:
        await phone.close()
        raise
    return phone


def level(x: Any, rate: int, freq: float, t0: float = 0.0, t1: float | None = None) -> float:
    """Median level of `freq` over the span (a steady tone)."""
    return tones.levels(x, rate, [freq], t0, t1)[freq]


def peak(x: Any, rate: int, freq: float) -> float:
    """Loudest 100 ms block of `freq` (a short, decaying chime)."""
    lv = tones.block_levels(x, rate, freq)
    return float(lv.max()) if len(lv) else tones.FLOOR_DBFS


async def test_browser_calls_the_demo_and_a_number_heard_and_recorded(
        gateway_factory, voice_app, receiver, tmp_path):
    rec, events_url = receiver

    async def script(req: Any, form: dict[str, str]) -> Any:
        if req.path.startswith("/tone/"):
            from aiohttp import web

            _, _, freq, secs = req.path.split("/")
            return web.Response(body=tone_wav_bytes(float(freq), float(secs[:-4])),
                                content_type="audio/wav")
        if "RecordingUrl" in form:
            return {"actions": [{"hangup": {}}]}
        return {"actions": [
            {"play": {"url": tone_file(voice_app, GATEWAY_HZ, 1.5)}},
            {"record": {"maxLength": 2, "playBeep": False, "timeout": 5}},
        ]}

    voice_app.script = script
    # Two slots in all: the third call gets one only if the first two gave theirs back.
    gw, _ = await start(gateway_factory, voice_app, events_url, demo=True,
                        workers=two_workers(calls=1))
    phone = await open_phone(gw, tmp_path, "alice", BROWSER_HZ)
    try:
        # 1. The demo number (any number no [[numbers]] entry has): the chime is heard.
        call = await phone.eval(f"sautiPhone.call('sip:{UNKNOWN}@' + 'x.invalid')")
        assert call["ok"], (call, gw.log_text()[-4000:])
        end = await phone.eval("sautiPhone.ended()", timeout=20)
        assert end["originator"] == "remote", end  # the demo hangs up
        x, rate = await phone.heard()
        assert peak(x, rate, DEMO_CHIME_HZ) > tones.HEARD_DBFS, "the chime was not heard"

        # 2. One of the gateway's numbers: the browser hears the prompt tone and the
        # recording holds the browser's microphone.
        await phone.eval("sautiPhone.clearHeard()")
        # (it tries to pass as someone else: the front drops the headers only it may set)
        spoof = json.dumps({"headers": ["X-Sautikit-Client: mallory",
                                        "X-Sautikit-Client-Number: +254799999999"]})
        call = await phone.eval(f"sautiPhone.call('sip:{NUMBER}@x.invalid', {spoof})")
        assert call["ok"], (call, gw.log_text()[-4000:])
        end = await phone.eval("sautiPhone.ended()", timeout=20)
        assert end["originator"] == "remote", end
        timings = await phone.eval("sautiPhone.timings()")
        x, rate = await phone.heard()
        assert level(x, rate, GATEWAY_HZ, 0.3, 1.2) > tones.HEARD_DBFS
        assert level(x, rate, BROWSER_HZ, 0.3, 1.2) < tones.HEARD_DBFS  # no echo of itself
        await slots_given_back(gw)
        # 3. Again the demo: both slots were given back when the calls ended.
        call = await phone.eval(f"sautiPhone.call('sip:{UNKNOWN}@x.invalid')")
        assert call["ok"], (call, gw.log_text()[-3000:])
        await phone.eval("sautiPhone.ended()", timeout=20)
    finally:
        await phone.close()

    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 1
                              and any(e.kind == "call.recording.ready" for e in evs), 15), \
        dump(rec.events)
    started = next(e for e in rec.events if e.kind == "call.started").body["data"]
    assert (started["client"], started["from"], started["to"], started["direction"]) == (
        "client:alice", NUMBER, NUMBER, "inbound"), started
    mine = [e for e in rec.events if e.body["data"]["call_id"] == started["call_id"]]
    assert [e.kind for e in mine] == ["call.started", "call.answered", "call.recording.ready",
                                      "call.completed"], dump(mine)
    assert all(e.body["data"].get("client") == "client:alice" for e in mine
               if e.kind != "call.recording.ready")
    first = voice_app.requests[0]["form"]
    assert first["client"] == "client:alice" and first["from"] == NUMBER
    ready = next(e for e in mine if e.kind == "call.recording.ready").body["data"]
    wav = tmp_path / "rec.wav"
    wav.write_bytes(await fetch_recording(ready["url"]))
    y, yrate = tones.read_wav(wav)
    assert level(y, yrate, BROWSER_HZ, 0.3) > tones.HEARD_DBFS, "the browser was not recorded"
    assert timings["answered_ms"] is not None and timings["first_audio_ms"] is not None


async def test_dial_client_rings_the_browser_and_both_hear(
        gateway_factory, voice_app, receiver, phone_farm, tmp_path):  # noqa: F811
    rec, events_url = receiver

    def script(req: Any, form: dict[str, str]) -> Any:
        if "DialCallStatus" in form:
            return {"actions": [{"hangup": {}}]}
        target = "client:alice" if form.get("from") != "+254733000009" else "client:nobody"
        return {"actions": [{"dial": {"sip": target, "timeout": 10}}]}

    voice_app.script = script
    gw, _ = await start(gateway_factory, voice_app, events_url)
    farm = await phone_farm(tone=PHONE_HZ)
    phone = await open_phone(gw, tmp_path, "alice", BROWSER_HZ)
    try:
        await phone.eval("sautiPhone.autoAnswer(true)")
        caller = await farm.call(gw.uri, PHONE_HZ, from_user="+254733000001")
        await farm.wait(caller, "answered", timeout=15)
        got = await phone.eval("sautiPhone.incoming()", timeout=20)
        assert got["ok"], (got, gw.log_text()[-4000:])
        await asyncio.sleep(2.0)
        await phone.eval("sautiPhone.hangup()")  # a closed browser sends no BYE: hang up first
        x, rate = await phone.heard()
        await farm.wait(caller, "disconnected", timeout=15)
        await slots_given_back(gw)  # the browser's BYE gave its leg's slot back
        assert level(x, rate, PHONE_HZ, 0.5, 1.8) > tones.HEARD_DBFS, "browser did not hear"
        y, yrate = farm.recording(caller)
        assert peak(y, yrate, BROWSER_HZ) > tones.HEARD_DBFS, "the phone did not hear the browser"

        # Nobody registered as `nobody`: the dial fails, with the reason.
        caller2 = await farm.call(gw.uri, PHONE_HZ, from_user="+254733000009")
        await farm.wait(caller2, "disconnected", timeout=15)
    finally:
        await phone.close()
    dials = [r["form"] for r in voice_app.requests if "DialCallStatus" in r["form"]]
    assert [d["DialCallStatus"] for d in dials] == ["completed", "failed"], dials
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 4, 15), dump(rec.events)
    legs = [e.body["data"] for e in rec.events if e.kind in ("call.completed", "call.failed")
            and e.body["data"].get("parent_call_id")]
    assert {(d.get("client"), d.get("reason")) for d in legs} >= {
        ("client:nobody", "client_not_registered")}, legs


async def test_the_demo_page_as_the_readme_says(gateway_factory, voice_app, tmp_path):
    """README "Call from a browser": open /demo/phone?demo=1, press Call: the demo answers."""
    gw, _ = await start(gateway_factory, voice_app, None, demo=True)
    phone = await BrowserPhone.launch(tone_wav(tmp_path / "mic.wav", BROWSER_HZ),
                                      tmp_path / "browser.log")
    try:
        await phone.goto(f"http://127.0.0.1:{gw.api_port}/demo/phone?demo=1")
        for _ in range(100):
            if (await phone.eval("sautiPhone.state()"))["registered"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(await phone.eval("document.getElementById('status').textContent"))
        await phone.eval(f"(document.getElementById('number').value = '{UNKNOWN}', "
                         "document.getElementById('call').click(), true)")
        end = await phone.eval("sautiPhone.ended()", timeout=20)
        assert end["originator"] == "remote", end
        x, rate = await phone.heard()
        assert peak(x, rate, DEMO_CHIME_HZ) > tones.HEARD_DBFS, "the chime was not heard"
    finally:
        await phone.close()


async def test_the_browser_is_refused_bad_tokens_and_kept_on_rotation(
        gateway_factory, voice_app, tmp_path):
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}
    gw, url = await start(gateway_factory, voice_app, None)
    phone = await BrowserPhone.launch(tone_wav(tmp_path / "mic.wav", BROWSER_HZ),
                                      tmp_path / "browser.log")
    uri = "sip:alice@webrtc.test.invalid"

    async def register(tok: str) -> dict[str, Any]:
        opts = {"token": tok, "endpoint": url, "uri": uri, "displayName": "alice"}
        got: dict[str, Any] = await phone.eval(f"sautiPhone.register({json.dumps(opts)})")
        await phone.eval("sautiPhone.stop()")
        return got

    try:
        await phone.goto(f"http://127.0.0.1:{gw.api_port}/demo/phone")
        expired = await register(token(KEY_OLD, "alice", NUMBER, ttl_s=30,
                                       now=time.time() - 60))
        assert (expired["ok"], expired["code"]) == (False, 401), expired
        removed = await register(token(KEY_REMOVED, "alice", NUMBER))
        assert (removed["ok"], removed["code"]) == (False, 403), removed
        # signed with the previous key (still listed): registered, for what it has left
        previous = await register(token(KEY_OLD, "alice", NUMBER, ttl_s=60))
        assert previous["ok"] and previous["code"] == 200, previous
        assert previous["expires"] is None or previous["expires"] <= 60, previous

        # A number that is not the gateway's (no demo here): the client's own number's app
        # places it, told `direction: outbound`.
        opts = {"token": token(KEY_OLD, "alice", NUMBER), "endpoint": url, "uri": uri}
        assert (await phone.eval(f"sautiPhone.register({json.dumps(opts)})"))["ok"]
        call = await phone.eval(f"sautiPhone.call('sip:{OUTSIDE}@x.invalid')")
        assert call["ok"], (call, gw.log_text()[-3000:])
        await phone.eval("sautiPhone.ended()", timeout=15)
    finally:
        await phone.close()
    form = voice_app.requests[0]["form"]
    assert (form["direction"], form["from"], form["to"], form["client"]) == (
        "outbound", NUMBER, OUTSIDE, "client:alice"), form
    log = gw.log_text()
    assert "token_expired" in log and "token_unknown_key" in log
