"""`aiAgent` on real calls: the gateway expands it into a `stream` to the operator's agent
runtime (`[ai_agents] url`), here a real aiohttp WebSocket agent (tests/integration/ws_agent.py);
the caller is a tonephone farm phone that plays a tone and records what it hears."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from media.audio import peak_frequency, read_wav
from tests import tones
from tests.integration.conftest import CALLER, NUMBER, dump, final_events
from tests.integration.test_stream import (
    CALLER_HZ,
    TONE_HZ,
    caller,
    doc,
    first_sound,
    gateway,
    heard_all,
    wait_request,
)
from tests.integration.tonephones import phone_farm  # noqa: F401
from tests.integration.ws_agent import (  # noqa: F401
    SUBPROTOCOL,
    AgentSession,
    closed_port,
    from_l16,
    l16,
    to_wall,
    ws_agents,
)

pytestmark = pytest.mark.integration
TOKEN = "agent-runtime-token"
PROLOGUE = "Karibu. Connecting you to our assistant."


def agents_cfg(url: str, *, rate: int = 8000, token: str | None = TOKEN) -> str:
    tok = f'token = "{token}"\n' if token else ""
    return (f'[ai_agents]\nurl = "{url}"\nsample_rate = {rate}\n{tok}'
            "[streams]\nconnect_timeout_s = 1\n")


async def test_prologue_then_agent_then_handover_to_callback_url(
    phone_farm, voice_app, receiver, gateway_factory, ws_agents  # noqa: F811
):
    """say prologue -> aiAgent: the runtime gets the upgrade (subprotocol, Bearer token) after
    the prologue, a first frame whose metadata carries agentId, revision, variables, the call
    and the workspace, and the caller's audio at [ai_agents] sample_rate; the caller hears the
    agent; the agent sends handover: callbackUrl is POSTed (AgentId, AgentHandover,
    HandoverData) and its document runs."""
    rec, events_url = receiver
    tl: dict[str, float] = {}

    async def script(s: AgentSession) -> None:
        await s.wait_preamble()
        await s.wait_frames(25, 5)
        tl["speak"], _ = await s.send_pcm(l16(tones.sine(TONE_HZ, 1.0, 16000)), 16000)
        await s.mark("spoken")
        await s.wait_event("mark", 5)
        tl["handover"] = time.time()
        await s.handover({"summary": "wants a refund", "intent": "refund"})

    agent = await ws_agents.agent(secret=voice_app.secret, script=script)

    def app(req: web.Request, form: dict[str, str]) -> Any:
        if req.path == "/after-agent":
            return doc({"say": {"text": "Goodbye."}}, {"hangup": {}})
        return doc({"say": {"text": PROLOGUE}},
                   {"aiAgent": {"agentId": "support-ke", "revision": 3,
                                "variables": {"tier": "gold", "n": 2},
                                "handover": {"callbackUrl": "/after-agent"},
                                "onUnavailable": "hangup"}})

    voice_app.script = app
    gw = gateway(gateway_factory, voice_app, events_url,
                 agents_cfg(agent.url("/runtime"), rate=16000))
    farm, cid, t_answer = await caller(phone_farm, gw)
    s = await agent.session(0, 15)
    pre = await s.wait_preamble()
    handed = await wait_request(voice_app, "/after-agent", 15)
    await s.wait_closed(5)
    x, rate = await heard_all(farm, cid)
    assert not agent.script_errors, agent.script_errors

    # the upgrade: subprotocol and the operator's token
    assert SUBPROTOCOL in s.requested_protocols and s.protocol == SUBPROTOCOL, s.headers
    assert s.path == "/runtime"
    assert s.headers.get("Authorization") == f"Bearer {TOKEN}", s.headers
    assert TOKEN not in gw.log_text(), "the runtime token was logged"
    # after the prologue (espeak says it in well over a second)
    assert s.opened_wall - t_answer > 1.0, s.opened_wall - t_answer
    prologue = x[: int(farm.offset(cid, s.opened_wall) * rate)]
    assert prologue.size and np.abs(prologue).max() > 0.05, "no prologue heard"

    call_id = voice_app.requests[0]["form"]["callId"]
    assert pre["event"] == "start" and pre["sampleRate"] == 16000, pre
    assert pre["callId"] == call_id and pre["from"] == CALLER and pre["to"] == NUMBER, pre
    meta = pre["metadata"]
    assert isinstance(meta, dict), pre
    assert meta["agentId"] == "support-ke" and meta["revision"] == 3, meta
    assert meta["variables"] == {"tier": "gold", "n": 2}, meta
    assert meta["workspaceId"] == "ws_1", meta
    assert meta["call"]["callId"] == call_id, meta
    assert meta["call"]["from"] == CALLER and meta["call"]["to"] == NUMBER, meta
    assert meta["call"]["direction"] == "inbound", meta
    # the caller's audio (its tone) reached the runtime at 16 kHz
    assert {len(f.data) for f in s.frames} == {640}
    got = from_l16(s.pcm())
    assert tones.hears(got, 16000, CALLER_HZ, 0.3, None), tones.levels(got, 16000)
    # the caller heard the agent
    on = first_sound(x, rate, farm.offset(cid, to_wall(tl["speak"])) - 0.05)
    assert on is not None and tones.hears(x, rate, TONE_HZ, on + 0.1, on + 0.9), tones.levels(
        x, rate, start_s=farm.offset(cid, to_wall(tl["speak"])))

    # the handover
    form = handed["form"]
    assert handed["method"] == "POST" and handed["signature_ok"], handed
    assert form["AgentId"] == "support-ke" and form["AgentHandover"] == "true", form
    assert json.loads(form["HandoverData"]) == {"summary": "wants a refund", "intent": "refund"}
    assert form["callId"] == call_id, form
    assert handed["at"] >= tl["handover"]
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    assert final_events(rec.events)[0].kind == "call.completed", dump(rec.events)


async def test_runtime_down_takes_a_voicemail(
    phone_farm, voice_app, receiver, gateway_factory, tmp_path  # noqa: F811
):
    """[ai_agents] url at a closed port, onUnavailable voicemail: the greeting, the beep, then
    a recording of the caller (its tone): call.recording.ready, the result to the voice app."""
    rec, events_url = receiver

    def app(req: web.Request, form: dict[str, str]) -> Any:
        if "RecordingUrl" in form:
            return doc({"hangup": {}})
        return doc({"aiAgent": {"agentId": "support-ke", "onUnavailable": "voicemail",
                                "voicemail": {"greetingText": "Please leave a message.",
                                              "maxLength": 3, "beep": True}}})

    voice_app.script = app
    gw = gateway(gateway_factory, voice_app, events_url,
                 agents_cfg(f"ws://127.0.0.1:{closed_port()}/runtime"))
    farm, cid, t_answer = await caller(phone_farm, gw)
    assert await rec.wait_for(
        lambda evs: [e for e in evs if e.kind == "call.recording.ready"] and final_events(evs),
        25), (dump(rec.events), gw.log_text()[-3000:])
    x, rate = await heard_all(farm, cid)
    ready = next(e for e in rec.events if e.kind == "call.recording.ready")
    assert ready.signature_ok
    data = ready.body["data"]
    assert 2.0 <= data["duration_seconds"] <= 3.6, data
    result = await wait_request(voice_app, "/voice", 5)  # the first fetch
    posted = next((r for r in voice_app.requests if "RecordingUrl" in r["form"]), None)
    assert posted is not None, voice_app.requests
    assert posted["form"]["recordingId"] == data["recording_id"], posted
    assert result["form"]["callId"] == data["call_id"]

    # the caller heard a greeting, then the beep (1 kHz), before the recording
    # (a pure 1 kHz block: loud there, 20 dB quieter 150 Hz either side, unlike speech)
    at1k = tones.block_levels(x, rate, 1000)
    beside = np.maximum(tones.block_levels(x, rate, 850), tones.block_levels(x, rate, 1150))
    pure = np.flatnonzero((at1k > -25) & (at1k - beside > 20))
    assert pure.size, f"no beep heard: 1 kHz peak {at1k.max():.1f} dBFS"
    beep_at = int(pure[0]) * tones.WINDOW_S
    assert np.abs(x[: int(beep_at * rate)]).max() > 0.05, "no greeting before the beep"

    # the recording is the caller's tone
    async with aiohttp.ClientSession() as http, http.get(
            data["url"], headers={"Authorization": "Bearer test-token"}) as r:
        assert r.status == 200
        wav = await r.read()
    path = tmp_path / "vm.wav"
    path.write_bytes(wav)
    y, yrate = read_wav(path)
    assert abs(peak_frequency(y, yrate) - CALLER_HZ) < 15, peak_frequency(y, yrate)
    assert final_events(rec.events)[0].kind == "call.completed", dump(rec.events)
    # unavailable was decided within the retry window (connection refused each time)
    assert ready.at - t_answer < 5 + 2 + 3.6 + 3, ready.at - t_answer


async def test_runtime_refusing_the_upgrade_runs_the_unavailable_callback(
    phone_farm, voice_app, receiver, gateway_factory, ws_agents  # noqa: F811
):
    """The runtime answers the upgrade with HTTP 403: onUnavailable callback POSTs to the
    handover's callbackUrl with AgentStatus=unavailable, and its document runs."""
    rec, events_url = receiver
    agent = await ws_agents.agent(secret=voice_app.secret, mode="refuse")

    def app(req: web.Request, form: dict[str, str]) -> Any:
        if req.path == "/agent-down":
            return doc({"say": {"text": "Our assistant is away."}}, {"hangup": {}})
        return doc({"aiAgent": {"agentId": "support-ke", "onUnavailable": "callback",
                                "handover": {"callbackUrl": "/agent-down"}}})

    voice_app.script = app
    gw = gateway(gateway_factory, voice_app, events_url, agents_cfg(agent.url("/runtime")))
    farm, cid, _ = await caller(phone_farm, gw)
    down = await wait_request(voice_app, "/agent-down", 15)
    assert down["signature_ok"], down
    form = down["form"]
    assert form["AgentId"] == "support-ke" and form["AgentStatus"] == "unavailable", form
    assert form.get("AgentError"), form
    assert "AgentHandover" not in form, form
    assert 1 <= len(agent.attempts) <= 3, agent.attempts  # refused: at most two retries
    assert not agent.sessions
    await farm.wait(cid, "disconnected", 15)
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    assert final_events(rec.events)[0].kind == "call.completed", dump(rec.events)
