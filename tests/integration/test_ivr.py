"""The issue's IVR, on a real call, with documents shaped exactly as the SDK writes them.

say -> getDigits (nested say; the caller presses 1) -> the app reads req.body.Digits and replies
with record -> the recording result reaches `action` -> call.recording.ready, call.completed.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from media.audio import peak_frequency, read_wav, tone, write_wav_atomic
from tests.integration.conftest import dump, final_events

pytestmark = pytest.mark.integration


async def test_ivr_digits_then_record(phone, voice_app, receiver, gateway_factory, tmp_path):
    rec, events_url = receiver

    def app(req: web.Request, body: dict[str, str]) -> Any:
        if req.path == "/voice" and "Digits" not in body:
            return {"actions": [
                {"say": {"text": "Karibu.", "voice": "woman", "language": "sw-KE"}},
                {"getDigits": {"timeout": 5, "numDigits": 1, "nested": [
                    {"say": {"text": "Press 1 to leave a message.", "language": "en-KE"}}]}},
                {"say": {"text": "Goodbye."}},
            ]}
        if req.path == "/voice" and body["Digits"] == "1":
            return {"actions": [{"record": {"action": "/voice/recorded", "maxLength": 10,
                                            "timeout": 4, "finishOnKey": "#"}}]}
        if req.path == "/voice/recorded":
            return {"actions": [{"hangup": {}}]}
        return web.Response(status=404)

    voice_app.script = app
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    message = tmp_path / "message.wav"
    write_wav_atomic(message, tone([440.0], 2.0, 8000, level_dbfs=-14), 8000)

    call = phone.make_call(gw.uri)
    await asyncio.wait_for(call.answer(), 10)
    await asyncio.sleep(1.5)  # into the nested prompt
    call.send_dtmf("1")
    await asyncio.sleep(1.2)  # the record verb's beep
    await call.play(message)
    call.send_dtmf("#")
    await asyncio.wait_for(call.wait_ended(), 15)

    paths = [(r["path"], r["form"].get("Digits")) for r in voice_app.requests]
    assert paths[:2] == [("/voice", None), ("/voice", "1")], paths
    assert paths[2][0] == "/voice/recorded"
    assert all(r["signature_ok"] for r in voice_app.requests)
    result = voice_app.requests[2]["form"]
    # a signed link the voice app can fetch without the API token (15 minutes)
    assert f"/recordings/{result['recordingId']}?exp=" in result["RecordingUrl"], result
    assert 2.0 <= float(result["RecordingDuration"]) <= 5.0, result

    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    kinds = [e.kind for e in rec.events]
    assert kinds[:2] == ["call.started", "call.answered"]
    assert "call.recording.ready" in kinds and kinds[-1] == "call.completed", kinds
    ready = next(e for e in rec.events if e.kind == "call.recording.ready").body["data"]
    assert set(ready) == {"recording_id", "call_id", "duration_seconds", "format",
                          "size_bytes", "sha256", "url"}
    assert ready["recording_id"] == result["recordingId"] and ready["format"] == "wav"
    assert all(e.signature_ok for e in rec.events)

    # The recording is served by the internal API (token required) and is what the caller said.
    async with aiohttp.ClientSession() as http:
        async with http.get(ready["url"]) as r:
            assert r.status == 401
        async with http.get(ready["url"], headers={"Authorization": "Bearer test-token"}) as r:
            assert r.status == 200
            wav = await r.read()
    assert len(wav) == ready["size_bytes"]
    assert hashlib.sha256(wav).hexdigest() == ready["sha256"]
    got = tmp_path / "got.wav"
    got.write_bytes(wav)
    x, rate = read_wav(got)
    assert abs(peak_frequency(x, rate) - 440.0) < 10, "the caller's tone, not the beep (1 kHz)"

    # The node logs one INFO line for the call, when it ends, with how it ended (each event
    # appended, the implicit answer and the like are DEBUG lines).
    call_id = ready["call_id"]

    def info_lines() -> list[str]:
        return [ln for ln in gw.log_text().splitlines() if call_id in ln and " INFO " in ln]

    for _ in range(50):
        if info_lines():
            break
        await asyncio.sleep(0.1)
    lines = info_lines()
    assert len(lines) == 1, lines
    assert f"call {call_id}: completed, inbound," in lines[0], lines
    assert "run hangup_verb, documents 3" in lines[0], lines
