"""Live control of an inbound call through the API: redirect and hangup mid-`say` and
mid-`getDigits`, commands to unknown and ended calls. A pjsua2 caller records what it hears."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from media.audio import active_duration, read_wav
from media.tts.espeak import EspeakTts
from tests.integration.conftest import dump, final_events
from tests.integration.test_outbound import api

pytestmark = pytest.mark.integration

LONG = ("This is a long announcement that keeps going for quite a while, so that there is "
        "plenty of time to interrupt it from the API before it ends on its own.")
BYE = "Goodbye."


async def tts_seconds(tmp: Path, text: str) -> float:
    wav = await EspeakTts(tmp / "tts").synthesize(text, None, "en-US", 8000)
    x, rate = read_wav(Path(wav))
    return active_duration(x, rate)


async def call_in(phone: Any, gw: Any, dest: Path) -> asyncio.Task[Any]:
    call = phone.make_call(gw.uri)
    await asyncio.wait_for(call.answer(), 10)
    return asyncio.ensure_future(
        call.record(dest, max_length_s=30, silence_timeout_s=0, finish_on_key="", beep=None)
    )


async def call_id_of(voice_app: Any, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while not voice_app.requests:
        assert time.monotonic() < deadline, "the voice app was never asked"
        await asyncio.sleep(0.05)
    return str(voice_app.requests[0]["form"]["callId"])


def gateway(gateway_factory: Any, voice_app: Any, events_url: str) -> Any:
    return gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url,
    )


async def test_redirect_mid_say_plays_the_new_document_at_once(
    phone, voice_app, receiver, gateway_factory, tmp_path
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"say": {"text": LONG}}, {"hangup": {}}]}
    gw = gateway(gateway_factory, voice_app, events_url)
    long_s, bye_s = await tts_seconds(tmp_path, LONG), await tts_seconds(tmp_path, BYE)
    assert long_s > 6
    listening = await call_in(phone, gw, tmp_path / "heard.wav")
    call_id = await call_id_of(voice_app)

    # an invalid document is refused with its path, and the call goes on untouched
    status, err = await api(gw, "POST", f"/v1/calls/{call_id}/redirect",
                            {"actions": [{"say": {"text": 42}}]})
    assert status == 422 and "actions[0].say" in err["error"]["message"], err

    await asyncio.sleep(2.0)
    status, got = await api(gw, "POST", f"/v1/calls/{call_id}/redirect",
                            {"actions": [{"say": {"text": BYE}}, {"hangup": {}}]})
    assert status == 200, got
    heard = await asyncio.wait_for(listening, 15)
    x, rate = read_wav(heard.path)
    # about 2 s of the long prompt, then the goodbye: far less than the long prompt alone
    assert 2.0 + bye_s - 1.0 < active_duration(x, rate) < 2.0 + bye_s + 1.5, (
        active_duration(x, rate), long_s, bye_s)
    assert len(voice_app.requests) == 1, "inline actions: nothing more is fetched"
    assert await rec.wait_for(lambda evs: final_events(evs, call_id), 10), dump(rec.events)
    assert final_events(rec.events, call_id)[0].body["data"]["status"] == "completed"


async def test_redirect_mid_get_digits_fetches_the_url_and_posts_no_digits(
    phone, voice_app, receiver, gateway_factory, tmp_path
):
    rec, events_url = receiver

    def script(req: Any, form: dict[str, str]) -> Any:
        if req.path == "/next":
            return {"actions": [{"say": {"text": BYE}}, {"hangup": {}}]}
        return {"actions": [{"getDigits": {"timeout": 20, "numDigits": 4,
                                           "nested": [{"say": {"text": "Enter your PIN."}}]}},
                            {"hangup": {}}]}

    voice_app.script = script
    gw = gateway(gateway_factory, voice_app, events_url)
    listening = await call_in(phone, gw, tmp_path / "heard.wav")
    call_id = await call_id_of(voice_app)
    await asyncio.sleep(3.0)  # the prompt is over; getDigits waits for keys
    t0 = time.monotonic()
    status, got = await api(gw, "POST", f"/v1/calls/{call_id}/redirect",
                            {"url": f"{voice_app.base_url}/next", "method": "POST"})
    assert status == 200, got
    await asyncio.wait_for(listening, 15)
    assert time.monotonic() - t0 < 6, "the redirect ran at once, not after the 20 s timeout"
    paths = [r["path"] for r in voice_app.requests]
    assert paths == ["/voice", "/next"], paths
    assert "Digits" not in voice_app.requests[1]["form"]
    assert voice_app.requests[1]["signature_ok"]
    assert await rec.wait_for(lambda evs: final_events(evs, call_id), 10), dump(rec.events)


@pytest.mark.parametrize("during", ["say", "getDigits"])
async def test_hangup_mid_verb_ends_the_call_and_is_idempotent(
    phone, voice_app, receiver, gateway_factory, tmp_path, during
):
    rec, events_url = receiver
    first = ({"say": {"text": LONG}} if during == "say"
             else {"getDigits": {"timeout": 20, "numDigits": 4}})
    voice_app.script = lambda req, form: {"actions": [first, {"hangup": {}}]}
    gw = gateway(gateway_factory, voice_app, events_url)
    listening = await call_in(phone, gw, tmp_path / "heard.wav")
    call_id = await call_id_of(voice_app)
    await asyncio.sleep(1.5)
    t0 = time.monotonic()
    status, got = await api(gw, "POST", f"/v1/calls/{call_id}/hangup")
    assert (status, got) == (200, {"call_id": call_id, "status": "hung_up"}), got
    heard = await asyncio.wait_for(listening, 10)
    assert heard.ended_by == "hangup" and time.monotonic() - t0 < 3
    assert await rec.wait_for(lambda evs: final_events(evs, call_id), 10), dump(rec.events)
    await asyncio.sleep(0.5)
    finals = final_events(rec.events, call_id)
    assert len(finals) == 1 and finals[0].body["data"]["status"] == "completed", dump(finals)
    assert len(voice_app.requests) == 1, "no Digits callback for an interrupted getDigits"
    # the ended call: hangup answers the same, redirect is refused, and GET shows it ended
    assert await api(gw, "POST", f"/v1/calls/{call_id}/hangup") == (200, got)
    status, err = await api(gw, "POST", f"/v1/calls/{call_id}/redirect",
                            {"actions": [{"hangup": {}}]})
    assert status == 409 and err["error"]["code"] == "calls.ended", err
    status, rec_ = await api(gw, "GET", f"/v1/calls/{call_id}")
    assert status == 200 and rec_["call"]["status"] == "completed", rec_


async def test_commands_to_an_unknown_call_are_404(voice_app, receiver, gateway_factory):
    _rec, events_url = receiver
    gw = gateway(gateway_factory, voice_app, events_url)
    for path, body in [("hangup", None), ("redirect", {"actions": [{"hangup": {}}]}),
                       ("respond", {"actions": [{"hangup": {}}]})]:
        status, err = await api(gw, "POST", f"/v1/calls/nope-123/{path}", body)
        assert status == 404 and err["error"]["code"] == "calls.not_found", (path, err)
    status, err = await api(gw, "GET", "/v1/calls/nope-123")
    assert status == 404 and err["error"]["code"] == "calls.not_found", err
    status, err = await api(gw, "GET", "/v1/calls/nope-123/recording")
    assert status == 404, err


async def test_recording_link_from_the_api_serves_the_file_without_the_token(
    phone, voice_app, receiver, gateway_factory, tmp_path
):
    import aiohttp

    rec, events_url = receiver
    voice_app.script = lambda req, form: (
        {"actions": [{"hangup": {}}]} if "RecordingUrl" in form else
        {"actions": [{"record": {"maxLength": 2, "playBeep": False}}, {"hangup": {}}]}
    )
    gw = gateway(gateway_factory, voice_app, events_url)
    call = phone.make_call(gw.uri)
    await asyncio.wait_for(call.answer(), 10)
    call_id = await call_id_of(voice_app)
    for _ in range(30):  # the record verb starts once the document is in
        status, body = await api(gw, "GET", f"/v1/calls/{call_id}/recording")
        if status != 404:
            break
        await asyncio.sleep(0.05)
    assert status == 202 and body["retry_after_seconds"] >= 1, (status, body)  # being written
    await asyncio.wait_for(call.wait_ended(), 15)
    assert await rec.wait_for(
        lambda evs: any(e.kind == "call.recording.ready" for e in evs), 10), dump(rec.events)
    ready = next(e for e in rec.events if e.kind == "call.recording.ready").body["data"]
    status, body = await api(gw, "GET", f"/v1/calls/{call_id}/recording")
    assert status == 302, body
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.api_port}/v1/calls/{call_id}/recording",
                            headers={"Authorization": "Bearer test-token"},
                            allow_redirects=False) as resp:
            link = resp.headers["Location"]
        assert "/recordings/" in link and "sig=" in link
        async with http.get(link) as resp:  # no token
            assert resp.status == 200 and resp.content_type == "audio/wav"
            assert len(await resp.read()) == ready["size_bytes"]
        async with http.get(link.replace("sig=", "sig=0")) as resp:
            assert resp.status == 403
