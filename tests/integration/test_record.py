"""`record` on real calls: a SIPp carrier plays SIPp's PCMA pcap; the recording is what it sent.

The carrier's audio is known sample by sample (tests/integration/pcap_audio.py decodes the pcap
with the G.711 tables PJSIP uses), so the recording is compared with it directly: aligned by
cross-correlation, then frame by frame.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from media.audio import beep, read_wav, resample
from tests.integration.conftest import dump, final_events, sipp
from tests.integration.pcap_audio import (
    RATE,
    Block,
    Carried,
    align,
    align_blocks,
    best_match,
    carried,
    frame_dbfs,
    pcap_audio,
    pooled_correlation,
    sound_span,
)

pytestmark = pytest.mark.integration
SIPP_DIR = Path(__file__).parent / "sipp"
G711A = Path("/usr/share/sip-tester/g711a.pcap")
RECORD_DOC = {
    "actions": [
        {
            "record": {
                "maxLength": 20,
                "timeout": 3,
                "finishOnKey": "#",
                "playBeep": True,
                "trimSilence": False,
            }
        },
        {"say": {"text": "The record result was not answered."}},
    ]
}
EVENT_FIELDS = {
    "recording_id",
    "call_id",
    "duration_seconds",
    "format",
    "size_bytes",
    "sha256",
    "url",
}


async def run_sipp(scenario: Path, gw_port: int, cwd: Path, timeout: float = 30) -> tuple[int, str]:
    """Run one SIPp call of `scenario` against the gateway; SIPp's files go to `cwd`."""
    code, _, _, out = await sipp(scenario, gw_port, timeout=timeout, cwd=cwd)
    return code, out


def record_app(voice_app: Any) -> list[dict[str, str]]:
    """The voice app: the record document first, then hangup in reply to the record result."""
    results: list[dict[str, str]] = []

    def script(req: web.Request, form: dict[str, str]) -> dict[str, Any]:
        if "RecordingUrl" in form:
            results.append(form)
            return {"actions": [{"hangup": {}}]}
        return RECORD_DOC

    voice_app.script = script
    return results


async def fetch_recording(url: str) -> bytes:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Authorization": "Bearer test-token"}) as resp,
    ):
        assert resp.status == 200, (resp.status, await resp.text())
        assert resp.content_type == "audio/wav"
        return await resp.read()


async def check_recording_handed_over(
    voice_app: Any, results: list[dict[str, str]], rec: Any, tmp_path: Path, gw: Any
) -> tuple[dict[str, Any], dict[str, str], Path]:
    """The result POST and `call.recording.ready` agree with each other and with the file the
    API serves; returns the event's data, the POSTed form and the fetched file."""
    assert await rec.wait_for(
        lambda evs: [e for e in evs if e.kind == "call.recording.ready"] and final_events(evs), 10
    ), (dump(rec.events), gw.log_text()[-3000:])
    # The result POST is made after the event is written: it may arrive after the event does.
    for _ in range(100):
        if results:
            break
        await asyncio.sleep(0.05)
    ready = [e for e in rec.events if e.kind == "call.recording.ready"]
    assert len(ready) == 1, dump(rec.events)
    assert ready[0].signature_ok
    data = ready[0].body["data"]
    assert set(data) == EVENT_FIELDS, data
    assert data["format"] == "wav"

    assert len(results) == 1, voice_app.requests
    form = results[0]
    post = next(r for r in voice_app.requests if "RecordingUrl" in r["form"])
    assert post["method"] == "POST" and post["signature_ok"], post
    assert post["content_type"] == "application/x-www-form-urlencoded"
    assert form["callId"] == data["call_id"]
    assert form["recordingId"] == data["recording_id"]
    assert data["url"].endswith(f"/v1/recordings/{data['recording_id']}")
    assert form["RecordingUrl"].split("?")[0].endswith(f"/recordings/{data['recording_id']}")
    assert form["RecordingDuration"] == str(round(data["duration_seconds"]))
    # the voice app's link works without the API token, and serves the same file
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(form["RecordingUrl"]) as resp:
        assert resp.status == 200, await resp.text()
        assert hashlib.sha256(await resp.read()).hexdigest() == data["sha256"]

    body = await fetch_recording(data["url"])
    assert len(body) == data["size_bytes"]
    assert hashlib.sha256(body).hexdigest() == data["sha256"]
    wav = tmp_path / "fetched.wav"
    wav.write_bytes(body)
    x, rate = read_wav(wav)
    assert abs(x.size / rate - data["duration_seconds"]) < 0.002, (x.size / rate, data)
    return data, form, wav


def recorded_8k(wav: Path) -> Any:
    x, rate = read_wav(wav)
    return x if rate == RATE else resample(x, rate, RATE)


@dataclass
class Comparison:
    lag: int  # sent[n] ~ recorded[n + lag], best single lag
    coeff: float  # correlation at that single lag
    blocks: list[Block]  # 0.5 s blocks, each aligned on its own
    pooled: float  # correlation with every block at its own lag
    got: Carried
    sent_s: float  # the sent audio's sound: first to last frame above -50 dBFS
    recorded_s: float  # the same measure on the recording
    rec_span: tuple[int, int]
    sent_span: tuple[int, int]

    def __str__(self) -> str:
        slips = sorted({b.lag - self.lag for b in self.blocks})
        weak = [f"{b.start / RATE:.1f}s:{b.coeff:.2f}" for b in self.blocks if b.coeff <= 0.8]
        return (
            f"lag {self.lag / RATE:.3f} s, correlation {self.coeff:.4f} at one lag, "
            f"{self.pooled:.4f} per 0.5 s block (block lag slips {slips} samples, weak blocks "
            f"{weak}); sound sent {self.sent_s:.3f} s, recorded {self.recorded_s:.3f} s; "
            f"carried {self.got.recorded_seconds:.3f} s of recording for "
            f"{self.got.seconds:.3f} s sent ({self.got.carried_frames}/{self.got.sound_frames} "
            f"frames)"
        )


def compare(x: Any, sent: Any) -> Comparison:
    lag, coeff = align(x, sent)
    blocks = align_blocks(x, sent, lag)
    sent_span = sound_span(sent)
    # The recording's frames cut where the sent audio's are, so spans compare sample-exact.
    rec_span = sound_span(x, offset=lag)
    assert sent_span is not None and rec_span is not None, "silent"
    return Comparison(
        lag,
        coeff,
        blocks,
        pooled_correlation(blocks),
        carried(x, sent, blocks),
        (sent_span[1] - sent_span[0]) / RATE,
        (rec_span[1] - rec_span[0]) / RATE,
        rec_span,
        sent_span,
    )


async def test_recording_is_what_the_caller_sent(voice_app, receiver, gateway_factory, tmp_path):
    rec, events_url = receiver
    results = record_app(voice_app)
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    code, out = await run_sipp(SIPP_DIR / "record_carrier.xml", gw.sip_port, tmp_path)
    # The recording first (SIPp fails too when the gateway hangs up early, with less to say).
    _, form, wav = await check_recording_handed_over(voice_app, results, rec, tmp_path, gw)
    assert form.get("Digits") == "#", f"the recording did not end at the '#': {form}"

    sent = pcap_audio(G711A)
    x = recorded_8k(wav)
    c = compare(x, sent)
    beep_match = best_match(x, beep(RATE))
    report = f"recording {x.size / RATE:.3f} s, {c}, beep match {beep_match:.3f}"
    print(report)
    # The recording is the sent audio, whole: strongly correlated once aligned (per block: the
    # jitter buffer may slip the timeline by 10 ms under load) ...
    assert c.pooled > 0.8, report
    sound_blocks = [b for b in c.blocks if b.coeff == b.coeff]
    assert sum(b.coeff > 0.8 for b in sound_blocks) >= 0.8 * len(sound_blocks), report
    assert c.got.fraction > 0.95, report
    # ... and the stretch of the recording that carries it is as long as what was sent.
    assert abs(c.got.recorded_seconds - c.sent_s) <= 0.1, report
    assert abs(c.got.seconds - c.sent_s) <= 0.1, report
    # Its non-silent part is that audio: it starts where the sent sound does, and ends with it
    # but for PJSIP's packet loss concealment, which continues the last sound when the caller's
    # stream stops (measured: 4 frames, 80 ms, fading from -27 to -48 dBFS).
    assert c.got.first == c.sent_span[0], report
    assert abs(c.rec_span[0] - c.got.recorded_first) <= 0.1 * RATE, report
    assert -0.1 <= c.recorded_s - c.sent_s <= 0.1 + 0.1, report
    assert code == 0, (out, gw.log_text()[-3000:])

    # The recording is of the caller, not of the prompt: the beep the caller heard is not in it.
    assert beep_match < 0.5, report
    # Before the caller's audio it is silence (the beep played in that time, to the caller).
    lead = frame_dbfs(x[: max(0, c.got.recorded_first)])
    assert lead.size == 0 or lead.max() < -50, (lead.max(), report)
    # It ran until the '#', sent 8 s after g711a.pcap started (the lag includes the jitter
    # buffer's delay, so a little less may show), not to a silence timeout (3 s after the
    # sound, about 10 s) or maxLength.
    assert 7.8 <= (x.size - c.lag) / RATE <= 8.5, report

    assert await rec.wait_for(lambda evs: final_events(evs), 10)
    await asyncio.sleep(0.5)  # a second final event would arrive by now
    finals = final_events(rec.events)
    assert [e.kind for e in finals] == ["call.completed"], dump(rec.events)
    kinds = [e.kind for e in rec.events]
    assert kinds.index("call.recording.ready") < kinds.index("call.completed"), kinds


async def test_caller_hangs_up_mid_recording(voice_app, receiver, gateway_factory, tmp_path):
    rec, events_url = receiver
    results = record_app(voice_app)
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    code, out = await run_sipp(SIPP_DIR / "record_hangup.xml", gw.sip_port, tmp_path)
    data, form, wav = await check_recording_handed_over(voice_app, results, rec, tmp_path, gw)
    assert "Digits" not in form, form
    assert round(data["duration_seconds"]) == int(form["RecordingDuration"])

    # The file kept is what the caller sent until the BYE: 3 s of g711a.pcap, whose first
    # 0.6 s is silence.
    sent = pcap_audio(G711A)[: 3 * RATE]
    x = recorded_8k(wav)
    c = compare(x, sent)
    report = f"recording {x.size / RATE:.3f} s, {c}"
    print(report)
    assert c.pooled > 0.8, report
    assert c.got.first == c.sent_span[0], report  # from the start of the sound ...
    assert c.sent_s - 0.3 <= c.got.seconds <= c.sent_s, report  # ... to about the BYE
    assert abs(c.got.recorded_seconds - c.got.seconds) <= 0.1, report
    assert c.got.fraction > 0.85, report
    assert code == 0, (out, gw.log_text()[-3000:])  # the BYE was the caller's, answered 200

    await asyncio.sleep(1.0)  # a second final event would arrive by now
    finals = final_events(rec.events)
    assert len(finals) == 1, dump(rec.events)
    assert finals[0].kind == "call.completed", dump(rec.events)
    assert finals[0].body["data"]["hangup_cause"] == "normal_clearing"
    assert len([e for e in rec.events if e.kind == "call.recording.ready"]) == 1
    # The voice app got the record result and nothing after it (its reply had no call).
    last = voice_app.requests[-1]["form"].get("RecordingUrl", "")
    assert f"/recordings/{data['recording_id']}?exp=" in last, last
