"""A real inbound call, end to end: pjsua2 caller -> gateway -> aiohttp voice app -> events."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from media.audio import active_duration, read_wav, rms_dbfs
from media.tts.espeak import EspeakTts
from tests.integration.conftest import CALLER, NUMBER, dump, final_events

pytestmark = pytest.mark.integration

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
GREETING = "Hello from Sautikit. Your call is connected."


async def call_and_listen(
    phone: Any, uri: str, dest: Path, *, hangup_after: float | None = None, max_s: float = 20
) -> Any:
    """Call `uri`, record what we hear until the far end hangs up (or we do)."""
    call = phone.make_call(uri, {"From": f"<sip:{CALLER}@127.0.0.1>"} if False else None)
    await asyncio.wait_for(call.answer(), 10)
    if hangup_after is not None:
        asyncio.get_running_loop().call_later(hangup_after, call.reject_now, 200)
    return await call.record(
        dest, max_length_s=max_s, silence_timeout_s=0, finish_on_key="", beep=None
    )


async def test_say_then_hangup_is_heard_and_reported(
    phone, voice_app, receiver, gateway_factory, tmp_path
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {
        "actions": [
            {"say": {"text": GREETING, "voice": "alice", "language": "en-US"}},
            {"hangup": {}},
        ]
    }
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    heard = await call_and_listen(phone, gw.uri, tmp_path / "heard.wav")
    assert heard.ended_by == "hangup", "the gateway hangs up after the document"
    assert await rec.wait_for(lambda evs: final_events(evs), 10), gw.log_text()

    # What the caller heard is the prompt: non-silent, about as long as the synthesized text.
    expected = await EspeakTts(tmp_path / "tts").synthesize(GREETING, "alice", "en-US", 8000)
    x_ref, r_ref = read_wav(Path(expected))
    x, rate = read_wav(heard.path)
    assert rate == 8000
    assert rms_dbfs(x) > -40
    assert abs(active_duration(x, rate) - active_duration(x_ref, r_ref)) < 0.5, (
        active_duration(x, rate),
        active_duration(x_ref, r_ref),
    )

    # The voice app got the call state, form-encoded and signed.
    assert len(voice_app.requests) == 1
    req = voice_app.requests[0]
    assert req["signature_ok"] and req["method"] == "POST"
    assert req["content_type"] == "application/x-www-form-urlencoded"
    form = req["form"]
    assert form["to"] == NUMBER and form["direction"] == "inbound"
    assert form["numberId"] == "num_1" and form["workspaceId"] == "ws_1"
    assert form["callStatus"] == "ringing" and form["callId"]

    # Events: started, answered, completed; signed; seed envelope and payload.
    await asyncio.sleep(0.3)
    kinds = [e.kind for e in rec.events]
    assert kinds == ["call.started", "call.answered", "call.completed"], dump(rec.events)
    for e in rec.events:
        assert e.signature_ok
        assert set(e.body) == {"kind", "event_id", "workspace_id", "occurred_at", "data"}
        assert e.body["workspace_id"] == "ws_1"
        assert RFC3339_MS.match(e.body["occurred_at"])
        assert e.body["event_id"][14] == "7", "event ids are UUIDv7"
        assert e.headers["X-Sautikit-Event"] == e.kind
        assert e.headers["X-Sautikit-Idempotency-Key"]
    done = rec.events[-1].body["data"]
    assert set(done) == {
        "call_id",
        "direction",
        "from",
        "to",
        "number_id",
        "status",
        "duration_seconds",
        "answered_at",
        "ended_at",
        "hangup_cause",
        "sip_code",  # beyond the seeds' example: every final event says how SIP ended
    }
    assert done["sip_code"] == 200
    assert done["call_id"] == form["callId"]
    assert done["status"] == "completed" and done["hangup_cause"] == "normal_clearing"
    assert done["direction"] == "inbound" and done["to"] == NUMBER
    assert done["number_id"] == "num_1"
    assert RFC3339_MS.match(done["answered_at"]) and RFC3339_MS.match(done["ended_at"])
    assert abs(done["duration_seconds"] - heard.duration_s) <= 1.5


async def test_caller_hangs_up_mid_say(phone, voice_app, receiver, gateway_factory, tmp_path):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {
        "actions": [
            {"say": {"text": "This is a long announcement. " * 8}},
            {"say": {"text": "You should never hear this."}},
        ]
    }
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    heard = await call_and_listen(phone, gw.uri, tmp_path / "heard.wav", hangup_after=1.5)
    assert heard.duration_s < 3
    assert await rec.wait_for(lambda evs: final_events(evs), 10), gw.log_text()
    await asyncio.sleep(1.0)  # a second final event would arrive by now
    finals = final_events(rec.events)
    assert len(finals) == 1, dump(rec.events)
    data = finals[0].body["data"]
    assert finals[0].kind == "call.completed"
    assert data["status"] == "completed" and data["hangup_cause"] == "normal_clearing"
    assert data["duration_seconds"] <= 3


@pytest.mark.parametrize(
    "failure,reason",
    [
        ("500", "callback_http_status"),
        ("timeout", "callback_timeout"),
        ("not_json", "callback_not_json"),
        ("invalid", "document_invalid"),
    ],
)
async def test_voice_app_failure_ends_call_with_one_failed_event(
    failure, reason, phone, voice_app, receiver, gateway_factory
):
    rec, events_url = receiver

    async def script(req: web.Request, form: dict[str, str]) -> Any:
        if failure == "500":
            return web.Response(status=500, text="boom")
        if failure == "timeout":
            await asyncio.sleep(3)  # the gateway's timeout_s is 2
            return {"actions": [{"hangup": {}}]}
        if failure == "not_json":
            return web.Response(text="<Response><Say>hi</Say></Response>", content_type="text/xml")
        return {"actions": [{"say": {"txt": "typo"}}]}

    voice_app.script = script
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    call = phone.make_call(gw.uri)
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert not end.was_answered
    assert end.sip_code == 500, end
    assert await rec.wait_for(lambda evs: final_events(evs), 10), gw.log_text()
    await asyncio.sleep(0.5)
    finals = final_events(rec.events)
    assert len(finals) == 1, dump(rec.events)
    assert finals[0].kind == "call.failed"
    data = finals[0].body["data"]
    assert data["status"] == "failed" and data["reason"] == reason
    assert data["sip_code"] == 500 and data["message"]
    assert [e.kind for e in rec.events] == ["call.started", "call.failed"]


async def test_cancel_before_answer(phone, voice_app, receiver, gateway_factory):
    rec, events_url = receiver

    async def slow(req: web.Request, form: dict[str, str]) -> Any:
        await asyncio.sleep(1.5)
        return {"actions": [{"say": {"text": "too late"}}]}

    voice_app.script = slow
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    call = phone.make_call(gw.uri)
    await asyncio.sleep(0.4)
    call.reject_now(487)  # an unanswered outgoing call: pjsua2 sends CANCEL
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert not end.was_answered
    assert await rec.wait_for(lambda evs: final_events(evs), 10), gw.log_text()
    await asyncio.sleep(2.0)  # the slow document arrives after the cancel: no second event
    finals = final_events(rec.events)
    assert len(finals) == 1, dump(rec.events)
    data = finals[0].body["data"]
    assert finals[0].kind == "call.failed"
    assert data["status"] == "canceled" and data["sip_code"] == 487
    assert data["hangup_cause"] == "originator_cancel"


@pytest.mark.parametrize(
    "reason,code,status", [("busy", 486, "busy"), ("rejected", 603, "rejected")]
)
async def test_reject_never_answers(
    reason, code, status, phone, voice_app, receiver, gateway_factory
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"reject": {"reason": reason}}]}
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    call = phone.make_call(gw.uri)
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert not end.was_answered and end.sip_code == code
    assert await rec.wait_for(lambda evs: final_events(evs), 10)
    data = final_events(rec.events)[0].body["data"]
    assert data["status"] == status and data["sip_code"] == code
    assert "call.answered" not in [e.kind for e in rec.events]


async def test_unknown_number_is_404_without_events(phone, voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    call = phone.make_call(f"sip:+254799999999@127.0.0.1:{gw.sip_port}")
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert end.sip_code == 404
    await asyncio.sleep(0.5)
    assert rec.events == [] and voice_app.requests == []
    assert "unknown number" in gw.log_text()


async def test_redirect_relative_url_replaces_document(
    phone, voice_app, receiver, gateway_factory, tmp_path
):
    rec, events_url = receiver

    def script(req: web.Request, form: dict[str, str]) -> Any:
        if req.path == "/voice":
            return {"actions": [{"redirect": {"url": "menu"}}, {"say": {"text": "never reached"}}]}
        return {"actions": [{"say": {"text": "Karibu", "language": "sw-KE"}}, {"hangup": {}}]}

    voice_app.script = script
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    heard = await call_and_listen(phone, gw.uri, tmp_path / "heard.wav")
    assert [r["path"] for r in voice_app.requests] == ["/voice", "/menu"]
    x, rate = read_wav(heard.path)
    assert 0.3 < active_duration(x, rate) < 2.5
    assert await rec.wait_for(lambda evs: final_events(evs), 10)
    assert final_events(rec.events)[0].body["data"]["status"] == "completed"


async def test_play_url_is_heard_as_sent(phone, voice_app, receiver, gateway_factory, tmp_path):
    """`play` fetches a FLAC from the voice app's server; the caller hears that tone."""
    import soundfile as sf

    from media.audio import peak_frequency, tone

    rec, events_url = receiver
    flac = tmp_path / "tone.flac"
    sf.write(str(flac), tone([697.0], 1.5, 16000, level_dbfs=-12), 16000, format="FLAC")

    def script(req: web.Request, form: dict[str, str]) -> Any:
        if req.path == "/tone.flac":
            return web.FileResponse(flac)
        return {"actions": [{"play": {"url": "/tone.flac"}}, {"hangup": {}}]}

    voice_app.script = script
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    heard = await call_and_listen(phone, gw.uri, tmp_path / "heard.wav")
    x, rate = read_wav(heard.path)
    assert abs(active_duration(x, rate) - 1.5) < 0.15, active_duration(x, rate)
    assert abs(peak_frequency(x, rate) - 697.0) < 10
    assert await rec.wait_for(lambda evs: final_events(evs), 10)
    assert final_events(rec.events)[0].body["data"]["status"] == "completed"


def _hold_outbox(path: Path, release: threading.Event) -> threading.Event:
    """Another writer's transaction on the node's outbox until `release`: the worker's own
    events wait behind it (busy_timeout), as on a disk slow to fsync."""
    held = threading.Event()

    def run() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(8)
        db.execute("COMMIT")
        db.close()

    threading.Thread(target=run, daemon=True, name="outbox-holder").start()
    return held


async def test_worker_killed_before_its_events_are_stored_still_reports_the_call(
    phone, voice_app, receiver, gateway_factory
):
    """Killed with call.started and call.answered still queued in the worker (never committed):
    the supervisor writes them, then call.failed worker_lost, from what the worker told it."""
    import os
    import signal

    from tests.integration.conftest import worker_pids

    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 30}}]}
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    release = threading.Event()
    try:
        held = _hold_outbox(gw.storage / "outbox.sqlite3", release)
        assert await asyncio.to_thread(held.wait, 5)
        call = phone.make_call(gw.uri)
        try:
            await asyncio.wait_for(call.answer(), 10)
            await asyncio.sleep(0.3)  # the worker's "in-progress" report reaches the supervisor
            os.kill(worker_pids(gw)[0], signal.SIGKILL)
            await asyncio.sleep(0.3)
            assert rec.events == []  # nothing was stored: the outbox was held throughout
            release.set()
            assert await rec.wait_for(lambda evs: len(evs) >= 3, 10), gw.log_text()
        finally:
            call.reject_now(200)
    finally:
        release.set()
    # (delivered concurrently: receivers order a call's events by occurred_at)
    assert sorted(e.kind for e in rec.events) == ["call.answered", "call.failed",
                                                  "call.started"], dump(rec.events)
    by_kind = {e.kind: e.body["data"] for e in rec.events}
    assert all(e.signature_ok for e in rec.events)
    started, answered, failed = (by_kind[k] for k in ("call.started", "call.answered",
                                                       "call.failed"))
    assert started["call_id"] == answered["call_id"] == failed["call_id"]
    assert started["to"] == NUMBER and started["direction"] == "inbound"
    assert RFC3339_MS.match(started["started_at"]) and RFC3339_MS.match(answered["answered_at"])
    assert failed["reason"] == "worker_lost" and failed["answered_at"] == answered["answered_at"]
    assert "call.started was not stored before worker 0 died" in gw.log_text()


async def test_worker_killed_mid_call_fails_its_call_and_restarts(phone, voice_app, receiver,
                                                                  gateway_factory, tmp_path):
    import os
    import signal

    from tests.integration.conftest import worker_pids

    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 30}}]}
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    call = phone.make_call(gw.uri)
    try:
        await asyncio.wait_for(call.answer(), 10)
        worker_pid = worker_pids(gw)[0]
        os.kill(worker_pid, signal.SIGKILL)
        assert await rec.wait_for(lambda evs: len(evs) >= 3, 10), gw.log_text()
    finally:
        call.reject_now(200)  # the phone still thinks it is talking; nobody will send it a BYE
    data = final_events(rec.events)[0].body["data"]
    assert final_events(rec.events)[0].kind == "call.failed"
    assert data["reason"] == "worker_lost" and data["status"] == "failed"
    # whether or not the worker's own call.started reached the disk before it died
    # (delivered concurrently: receivers order a call's events by occurred_at)
    assert sorted(e.kind for e in rec.events) == ["call.answered", "call.failed",
                                                  "call.started"], dump(rec.events)
    # The supervisor restarted the worker: the next call is served.
    voice_app.script = lambda req, form: {"actions": [{"say": {"text": "Back."}},
                                                      {"hangup": {}}]}
    for _ in range(50):
        if "worker 0 ready" in gw.log_text().split("exited", 1)[-1]:
            break
        await asyncio.sleep(0.1)
    heard = await call_and_listen(phone, gw.uri, tmp_path / "again.wav")
    assert heard.ended_by == "hangup"
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 2, 10)
    assert final_events(rec.events)[1].kind == "call.completed"
