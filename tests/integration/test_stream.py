"""`stream` on real calls: a gateway node, real callers (SIPp playing a pcap; tonephone farms
that play a tone and record what they hear) and a real aiohttp WebSocket agent
(tests/integration/ws_agent.py) speaking the `audio.drachtio.org` subprotocol.

What the agent receives is compared with what the caller sent sample by sample (SIPp's
g711a.pcap speech, aligned by cross-correlation); what the caller hears is compared with what
the agent sent the same way; timings (killAudio -> silence, marks) are read on the caller's
recording, each measured against the path's own onset delay so the far end's jitter buffer
cancels out.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from media.audio import resample
from tests import tones
from tests.integration.conftest import CALLER, NUMBER, dump, final_events, sipp
from tests.integration.pcap_audio import (
    RATE,
    align,
    align_blocks,
    carried,
    pcap_audio,
    pooled_correlation,
    write_rtp_pcap,
)
from tests.integration.test_outbound import api
from tests.integration.tonephones import FarmFactory, PhoneFarm, phone_farm  # noqa: F401
from tests.integration.ws_agent import (  # noqa: F401
    SUBPROTOCOL,
    Agents,
    AgentSession,
    from_l16,
    l16,
    to_wall,
    ws_agents,
)

pytestmark = pytest.mark.integration
SIPP_DIR = Path(__file__).parent / "sipp"
G711A = Path("/usr/share/sip-tester/g711a.pcap")
CALLER_HZ = 770
TONE_HZ, AFTER_HZ = 941, 1209
SOUND = 0.02  # |sample| above this is sound (tones at 0.5; G.711 silence decodes to <= 0.0003)
STREAMS_CFG = "[streams]\nconnect_timeout_s = 1\n"


# -- helpers --------------------------------------------------------------------------------
def speech(a_s: float, b_s: float) -> Any:
    """A stretch of g711a.pcap's speech (8 kHz floats, exactly A-law levels)."""
    x = pcap_audio(G711A)
    return x[int(a_s * RATE):int(b_s * RATE)].astype(np.float64)


def at_rate(x: Any, rate: int) -> Any:
    return x if rate == RATE else resample(x, RATE, rate)


def doc(*actions: dict[str, Any]) -> dict[str, Any]:
    return {"actions": list(actions)}


def gateway(gateway_factory: Any, voice_app: Any, events_url: str, extra: str = "") -> Any:
    return gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                           events_url=events_url, extra=extra)


async def caller(phone_farm: FarmFactory, gw: Any) -> tuple[PhoneFarm, str, float]:  # noqa: F811
    """A farm phone calling the gateway, playing CALLER_HZ; (farm, call, answered at (wall))."""
    farm = await phone_farm(tone=CALLER_HZ)
    cid = await farm.call(gw.uri, CALLER_HZ, from_user=CALLER)
    await farm.wait(cid, "answered", 10)
    return farm, cid, time.time()


async def heard_all(farm: PhoneFarm, cid: str, timeout: float = 20) -> tuple[Any, int]:
    """What the phone heard, once its call ended (8 kHz floats)."""
    await farm.wait(cid, "disconnected", timeout)
    x, rate = farm.recording(cid)
    return (x if rate == RATE else resample(x, rate, RATE)), RATE


def request_at(voice_app: Any, path: str) -> dict[str, Any] | None:
    return next((r for r in voice_app.requests if r["path"] == path), None)


async def wait_request(voice_app: Any, path: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (r := request_at(voice_app, path)) is None:
        assert time.monotonic() < deadline, (
            f"no request to {path}: {[q['path'] for q in voice_app.requests]}")
        await asyncio.sleep(0.05)
    return r


def first_sound(x: Any, rate: int, after_s: float) -> float | None:
    i0 = max(0, int(after_s * rate))
    hit = np.flatnonzero(np.abs(x[i0:]) > SOUND)
    return None if hit.size == 0 else (i0 + int(hit[0])) / rate


def sound_end(x: Any, rate: int, after_s: float, quiet_s: float = 0.04) -> float | None:
    """Where the sound that goes on at `after_s` stops: the start of the first stretch of
    `quiet_s` without a sample above SOUND."""
    i0 = max(0, int(after_s * rate))
    loud = np.abs(x[i0:]) > SOUND
    idx = np.flatnonzero(loud)
    if idx.size == 0:
        return None
    gaps = np.flatnonzero(np.diff(idx) > quiet_s * rate)
    last = idx[gaps[0]] if gaps.size else idx[-1]
    return (i0 + int(last) + 1) / rate


def check_pacing(frames: list[Any], label: str) -> str:
    """Frames arrive one per 20 ms, steadily: returns the figures (asserts them)."""
    t = np.array([f.at for f in frames])
    d = np.diff(t)
    n = len(frames)
    span = t[-1] - t[0]
    # lateness of frame k against the steady 20 ms schedule of the first frame
    late = t - (t[0] + 0.02 * np.arange(n))
    spread = float(late.max() - late.min())
    fig = (f"{label}: {n} frames over {span:.3f} s ({(n - 1) / span:.2f}/s), inter-arrival "
           f"p50 {np.median(d) * 1e3:.1f} ms p99 {np.percentile(d, 99) * 1e3:.1f} ms max "
           f"{d.max() * 1e3:.1f} ms, schedule spread {spread * 1e3:.0f} ms")
    assert 17.5e-3 <= float(np.median(d)) <= 22.5e-3, fig
    assert abs((n - 1) * 0.02 - span) <= 0.02 * span + 0.04, fig  # 50 frames a second
    assert spread <= 0.15, fig  # no bursts: never more than a few frames ahead or behind
    return fig


# -- caller audio -> the socket ----------------------------------------------------------------
async def test_caller_audio_reaches_the_socket_at_8k_and_16k(
    voice_app, receiver, gateway_factory, ws_agents, tmp_path  # noqa: F811
):
    """SIPp plays known speech; the agent's frames carry it, at 8000 and at 16000 Hz
    (two calls at once), 20 ms each, one every 20 ms."""
    rec, events_url = receiver
    sent = speech(0.4, 3.6)  # 3.2 s: a little silence, then speech
    pcap = tmp_path / "speech.pcap"
    write_rtp_pcap(pcap, sent, law="PCMA")
    scenario = tmp_path / "stream_carrier.xml"
    scenario.write_text((SIPP_DIR / "stream_carrier.xml").read_text().replace("@PCAP@",
                                                                              str(pcap)))
    listen_s = 0.4 + sent.size / RATE + 1.0

    async def script(s: AgentSession) -> None:
        await s.wait_preamble()
        await asyncio.sleep(max(0.0, s.opened_at + listen_s - time.monotonic()))
        await s.close(1000)  # the document goes on: hangup

    agent = await ws_agents.agent(secret=voice_app.secret, script=script)
    rates = iter([8000, 16000])

    def app(req: web.Request, form: dict[str, str]) -> Any:
        rate = next(rates)
        return doc({"stream": {"url": agent.url(f"/r{rate}"), "connect": True,
                               "outputSamplingRate": rate}}, {"hangup": {}})

    voice_app.script = app
    gw = gateway(gateway_factory, voice_app, events_url)
    dirs = [tmp_path / f"sipp{i}" for i in range(2)]
    for d in dirs:
        d.mkdir()
    results = await asyncio.gather(*(sipp(scenario, gw.sip_port, timeout=30, cwd=d)
                                     for d in dirs))
    assert len(agent.sessions) == 2, (agent.attempts, gw.log_text()[-3000:])
    figures = []
    for s in agent.sessions:
        rate = int(s.path[2:])
        assert SUBPROTOCOL in s.requested_protocols and s.protocol == SUBPROTOCOL, s.headers
        pre = s.preamble
        assert pre is not None and pre["event"] == "start", pre
        assert pre["sampleRate"] == rate and pre["mixType"] == "mono", pre
        assert pre["callId"] == pre["callSid"] and pre["direction"] == "inbound", pre
        assert pre["from"] == CALLER and pre["to"] == NUMBER, pre
        assert pre["track"] == "inbound_track" and pre["streamName"] == "stream-1", pre
        assert pre["headers"] == {}, pre
        assert not s.bad_text, s.bad_text
        assert {len(f.data) for f in s.frames} == {rate // 50 * 2}, (
            rate, sorted({len(f.data) for f in s.frames}))
        figures.append(check_pacing(s.frames, f"{rate} Hz"))
        got = from_l16(s.pcm())
        got8 = got if rate == RATE else resample(got, rate, RATE)
        lag, coeff = align(got8, sent)
        blocks = align_blocks(got8, sent, lag)
        c = carried(got8, sent, blocks, max_error_db=-10.0)
        pooled = pooled_correlation(blocks)
        fig = (f"{rate} Hz: lag {lag / RATE:.3f} s, correlation {coeff:.3f} (pooled "
               f"{pooled:.3f}), carried {c.carried_frames}/{c.sound_frames} frames, "
               f"{c.recorded_seconds:.3f} s for {c.seconds:.3f} s sent")
        figures.append(fig)
        assert pooled > 0.9 and coeff > 0.8, fig
        assert c.fraction > 0.95, fig
        assert abs(c.recorded_seconds - c.seconds) <= 0.06, fig  # nothing lost or doubled
    print("\n".join(figures))
    for code, ok, _failed, out in results:
        assert code == 0 and ok == 1, out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 2, 10), dump(rec.events)
    assert {e.kind for e in final_events(rec.events)} == {"call.completed"}, dump(rec.events)


# -- the socket -> the caller ------------------------------------------------------------------
async def test_caller_hears_binary_and_play_audio_in_order_without_gaps(
    phone_farm, voice_app, receiver, gateway_factory, ws_agents  # noqa: F811
):
    """Binary L16 at 16 kHz in odd-sized chunks, a playAudio wav at 8 kHz, a playAudio raw at
    24 kHz, then a mark: the caller hears the three, in order, with no gap between them; each
    playAudio answers playDone once played, the mark `playout` once all has played."""
    rec, events_url = receiver
    parts = [speech(0.6, 2.0), speech(2.0, 3.4), speech(3.4, 4.8)]
    expect = np.concatenate(parts)
    timeline: dict[str, float] = {}

    async def script(s: AgentSession) -> None:
        await s.wait_preamble()
        await asyncio.sleep(0.3)
        timeline["start"], _ = await s.send_pcm(l16(at_rate(parts[0], 16000)), 16000,
                                                chunk_ms=30)
        await s.play_audio(l16(parts[1]), 8000, kind="wav")
        await s.play_audio(l16(at_rate(parts[2], 24000)), 24000, kind="raw")
        await s.mark("end")
        await s.wait_event("mark", 15, pred=lambda m: m["data"]["name"] == "end")
        await asyncio.sleep(0.3)
        timeline["disconnect"] = await s.disconnect()

    agent = await ws_agents.agent(secret=voice_app.secret, script=script)
    voice_app.script = lambda req, form: doc(
        {"stream": {"url": agent.url(), "connect": True, "bidirectionalSamplingRate": 16000}},
        {"hangup": {}})
    gw = gateway(gateway_factory, voice_app, events_url)
    farm, cid, _ = await caller(phone_farm, gw)
    s = await agent.session(0)
    await s.wait_closed(20)
    assert not agent.script_errors, agent.script_errors
    x, _ = await heard_all(farm, cid)

    lag, coeff = align(x, expect)
    blocks = align_blocks(x, expect, lag)
    c = carried(x, expect, blocks)
    slips = sorted({b.lag - lag for b in blocks})
    fig = (f"heard: lag {lag / RATE:.3f} s, correlation {coeff:.3f} (pooled "
           f"{pooled_correlation(blocks):.3f}), carried {c.carried_frames}/{c.sound_frames} "
           f"frames, {c.recorded_seconds:.3f} s heard for {c.seconds:.3f} s sent, block lag "
           f"slips {slips} samples")
    print(fig)
    assert pooled_correlation(blocks) > 0.85, fig
    assert c.fraction > 0.9, fig  # all three parts, in this order (one alignment)
    # no gap anywhere (a missed 20 ms frame would stretch what was heard by 160 samples)
    assert abs(c.recorded_seconds - c.seconds) < 0.015, fig
    assert max(slips) - min(slips) < 160, fig

    # playDone after each clip has played; the mark after everything (the audio's timeline:
    # 1.4 s, then 1.4 s, then 1.4 s from the first frame)
    done = s.events("playDone")
    mark = s.events("mark")
    assert len(done) == 2 and all(d.data.get("type") == "playDone" for d in done), s.texts
    assert [m.data["data"] for m in mark] == [{"name": "end", "event": "playout"}], s.texts
    t0 = timeline["start"]
    for d, due in zip([*done, mark[0]], (2.8, 4.2, 4.2), strict=True):
        assert due - 0.1 <= d.at - t0 <= due + 0.4, (d.data, d.at - t0, due)
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    assert final_events(rec.events)[0].kind == "call.completed"


async def test_kill_audio_silences_the_caller_and_clears_marks(
    phone_farm, voice_app, receiver, gateway_factory, ws_agents  # noqa: F811
):
    """4 s of tone queued, two marks after it; killAudio 1.5 s in: the caller's audio goes
    quiet within 150 ms (goal on the gateway: 40 ms; the bound allows a loaded 2-core box),
    both marks come back `cleared`, the killed tone never plays again, and audio sent after the
    kill plays. clearMarks answers a pending mark `cleared` without stopping the audio."""
    rec, events_url = receiver
    tl: dict[str, float] = {}

    async def script(s: AgentSession) -> None:
        await s.wait_preamble()
        await asyncio.sleep(0.3)
        tl["tone"], _ = await s.send_pcm(l16(tones.sine(TONE_HZ, 4.0, 8000)), 8000, chunk_ms=100)
        await s.mark("a")
        await s.mark("b")
        await asyncio.sleep(1.5)
        tl["kill"] = await s.kill_audio()
        await s.wait_event("mark", 3, pred=lambda m: m["data"]["name"] == "b")
        await asyncio.sleep(0.5)
        tl["after"], _ = await s.send_pcm(l16(tones.sine(AFTER_HZ, 1.0, 8000)), 8000)
        await s.mark("c")
        await s.wait_event("mark", 5, pred=lambda m: m["data"]["name"] == "c")
        tl["again"], _ = await s.send_pcm(l16(tones.sine(AFTER_HZ, 1.0, 8000)), 8000)
        await s.mark("d")
        await asyncio.sleep(0.2)
        tl["clear"] = await s.clear_marks()
        await s.wait_event("mark", 3, pred=lambda m: m["data"]["name"] == "d")
        await asyncio.sleep(1.2)
        await s.disconnect()

    agent = await ws_agents.agent(secret=voice_app.secret, script=script)
    voice_app.script = lambda req, form: doc({"stream": {"url": agent.url(), "connect": True}},
                                             {"hangup": {}})
    gw = gateway(gateway_factory, voice_app, events_url)
    farm, cid, _ = await caller(phone_farm, gw)
    s = await agent.session(0)
    await s.wait_closed(20)
    assert not agent.script_errors, (agent.script_errors, [t.data for t in s.texts])
    x, rate = await heard_all(farm, cid)

    marks = {m.data["data"]["name"]: (m.at, m.data["data"]["event"]) for m in s.events("mark")}
    assert {k: v[1] for k, v in marks.items()} == {
        "a": "cleared", "b": "cleared", "c": "playout", "d": "cleared"}, s.texts
    assert marks["a"][0] - tl["kill"] < 0.5 and marks["b"][0] - tl["kill"] < 0.5, marks
    assert marks["d"][0] - tl["clear"] < 0.5, marks  # at once, not when the audio ends
    assert 0.9 <= marks["c"][0] - tl["after"] <= 1.5, (marks, tl)  # c: when its audio ended

    off = farm.offset
    on = first_sound(x, rate, off(cid, to_wall(tl["tone"])) - 0.05)
    assert on is not None, "the caller never heard the tone"
    end = sound_end(x, rate, on)
    assert end is not None
    onset_delay = on - off(cid, to_wall(tl["tone"]))
    kill_delay = end - off(cid, to_wall(tl["kill"]))
    fig = (f"tone onset {onset_delay * 1e3:.0f} ms after it was sent, quiet "
           f"{kill_delay * 1e3:.0f} ms after killAudio: the kill took "
           f"{(kill_delay - onset_delay) * 1e3:.0f} ms beyond the path's own delay")
    print(fig)
    assert 1.3 <= end - on <= 1.5 + 0.25, fig  # it played from the queue until the kill
    assert kill_delay - onset_delay < 0.15, fig
    # the killed tone never comes back; the tone sent after the kill plays
    after_on = first_sound(x, rate, end + 0.04)
    assert after_on is not None and after_on >= off(cid, to_wall(tl["after"])) - 0.05, fig
    assert not tones.hears(x, rate, TONE_HZ, end + 0.05, None), tones.levels(
        x, rate, start_s=end + 0.05)
    assert tones.hears(x, rate, AFTER_HZ, after_on + 0.1, after_on + 0.9)
    # clearMarks did not cut the audio: the second 1 s of tone after the kill played whole
    again_on = first_sound(x, rate, off(cid, to_wall(tl["again"])) - 0.05)
    assert again_on is not None
    again_end = sound_end(x, rate, again_on)
    assert again_end is not None and again_end - again_on >= 0.9, (again_on, again_end)
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)


# -- the document around the socket ------------------------------------------------------------
async def test_dtmf_reaches_the_socket_and_disconnect_continues_the_document(
    phone_farm, voice_app, receiver, gateway_factory, ws_agents  # noqa: F811
):
    """The caller presses 5: the agent gets {"event": "dtmf", "dtmf": "5", "duration"}; the
    agent sends disconnect: the gateway closes the socket and the document's next action (a
    redirect) runs. stream-started and stream-stopped are POSTed, signed, to statusCallback."""
    rec, events_url = receiver
    tl: dict[str, float] = {}

    async def script(s: AgentSession) -> None:
        await s.wait_preamble()
        try:
            await s.wait_event("dtmf", 8)
        finally:
            await asyncio.sleep(0.2)
            tl["disconnect"] = time.time()
            await s.disconnect()

    agent = await ws_agents.agent(secret=voice_app.secret, script=script)

    def app(req: web.Request, form: dict[str, str]) -> Any:
        if req.path == "/after":
            return doc({"hangup": {}})
        return doc({"stream": {"url": agent.url("/agent?x=1"), "connect": True, "name": "agent",
                               "headerMetadata": json.dumps({"tenant": "acme", "n": 7}),
                               "openMetadata": "order-42", "statusCallback": agent.status_url}},
                   {"redirect": {"url": "/after"}})

    voice_app.script = app
    gw = gateway(gateway_factory, voice_app, events_url)
    farm, cid, _ = await caller(phone_farm, gw)
    s = await agent.session(0)
    pre = await s.wait_preamble()
    await asyncio.sleep(0.3)
    await farm.send_dtmf(cid, "5")
    after = await wait_request(voice_app, "/after", 15)
    await s.wait_closed(5)
    assert not agent.script_errors, agent.script_errors
    assert s.query == {"x": "1"}, s.query
    assert pre["headers"] == {"tenant": "acme", "n": 7} and pre["metadata"] == "order-42", pre
    assert pre["streamName"] == "agent", pre

    dtmf = s.events("dtmf")
    assert len(dtmf) == 1, [t.data for t in s.texts]
    d = dtmf[0].data
    assert d["event"] == "dtmf" and d["dtmf"] == "5", d
    assert isinstance(d["duration"], int) and d["duration"] > 0, d
    # the gateway closed the socket (a normal close), then the document went on
    assert s.close_code == 1000, s.close_code
    assert after["at"] >= tl["disconnect"], (after, tl)
    assert after["form"]["callId"] == pre["callId"] and after["signature_ok"]
    await farm.wait(cid, "disconnected", 10)

    started = await agent.wait_status("stream-started", 5)
    stopped = await agent.wait_status("stream-stopped", 5)
    for p in (started, stopped):
        assert p.signature_ok, p.headers
        b = p.body
        assert b["callId"] == pre["callId"] and b["streamName"] == "agent", b
        assert b["streamUrl"].startswith(agent.url("/agent")), b
        assert "timestamp" in b, b
    assert started.at < stopped.at
    assert not [p for p in agent.status if p.body.get("event") == "stream-error"], agent.status
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    assert final_events(rec.events)[0].kind == "call.completed"


async def test_background_fork_runs_while_the_document_goes_on(
    phone_farm, voice_app, receiver, gateway_factory, ws_agents  # noqa: F811
):
    """connect: false: the document goes straight on (getDigits with a prompt) while frames
    keep flowing to the agent; the digit reaches both getDigits and the socket; the fork ends
    with the call."""
    rec, events_url = receiver
    agent = await ws_agents.agent(secret=voice_app.secret)

    def app(req: web.Request, form: dict[str, str]) -> Any:
        if "Digits" in form:
            return doc({"say": {"text": "Thank you."}}, {"hangup": {}})
        return doc({"stream": {"url": agent.url(), "connect": False}},
                   {"getDigits": {"numDigits": 1, "timeout": 8, "nested": [
                       {"say": {"text": "Please press a key."}}]}},
                   {"hangup": {}})

    voice_app.script = app
    gw = gateway(gateway_factory, voice_app, events_url)
    farm, cid, _ = await caller(phone_farm, gw)
    s = await agent.session(0)
    await s.wait_preamble()
    await s.wait_frames(25, 5)
    await asyncio.sleep(1.0)
    await farm.send_dtmf(cid, "7")
    await farm.wait(cid, "disconnected", 15)
    await s.wait_closed(5)
    digits = next(r for r in voice_app.requests if "Digits" in r["form"])
    assert digits["form"]["Digits"] == "7", digits
    # frames flowed during the getDigits, up to the call's end
    walls = np.array([f.wall for f in s.frames])
    assert (walls < digits["at"]).sum() >= 50, (len(walls), digits["at"])
    assert walls[-1] >= digits["at"] + 0.2, "frames stopped before the document moved on"
    assert s.closed_wall is not None and s.closed_wall >= digits["at"]
    check_pacing(s.frames[5:-5], "background fork")
    got = from_l16(s.pcm())
    assert tones.hears(got, 8000, CALLER_HZ, 0.5, None), tones.levels(got, 8000)
    assert [d.data["dtmf"] for d in s.events("dtmf")] == ["7"], [t.data for t in s.texts]
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    assert final_events(rec.events)[0].kind == "call.completed"


async def test_live_stop_through_the_api(
    phone_farm, voice_app, receiver, gateway_factory, ws_agents  # noqa: F811
):
    """POST /v1/calls/{id}/stream {"action": "stop"} stops a background fork: the socket is
    closed, stream-stopped is posted, and the call goes on."""
    rec, events_url = receiver
    agent = await ws_agents.agent(secret=voice_app.secret)
    voice_app.script = lambda req, form: doc(
        {"stream": {"url": agent.url(), "name": "bg", "statusCallback": agent.status_url,
                    "statusEvents": "stream-started stream-stopped"}},
        {"pause": {"length": 20}}, {"hangup": {}})
    gw = gateway(gateway_factory, voice_app, events_url)
    farm, cid, _ = await caller(phone_farm, gw)
    s = await agent.session(0)
    pre = await s.wait_preamble()
    await s.wait_frames(10, 5)
    call_id = pre["callId"]
    assert call_id == voice_app.requests[0]["form"]["callId"]

    status, body = await api(gw, "POST", f"/v1/calls/{call_id}/stream", {"action": "pause"})
    # the API's convention (docs/streams.md): 422 naming the field
    assert status == 422 and body["error"]["errors"][0]["path"] == "action", body
    status, body = await api(gw, "POST", "/v1/calls/nosuchcall/stream", {"action": "stop"})
    assert status == 404, body
    assert not s.closed.is_set()

    status, body = await api(gw, "POST", f"/v1/calls/{call_id}/stream",
                             {"action": "stop", "name": "bg"})
    t_stop = time.monotonic()
    assert status == 200, body
    assert body == {"call_id": call_id, "status": "stopped", "stopped": 1}, body
    await s.wait_closed(3)
    assert s.closed_at is not None and s.closed_at - t_stop < 2.0
    stopped = await agent.wait_status("stream-stopped", 5)
    assert stopped.signature_ok and stopped.body["streamName"] == "bg", stopped.body
    assert (await agent.wait_status("stream-started", 1)).signature_ok
    # the call goes on (the pause), and nothing more is streamed
    await asyncio.sleep(1.0)
    assert farm.of(cid, "disconnected") is None, "the stop ended the call"
    assert len(agent.sessions) == 1, "the fork was reconnected"
    status, body = await api(gw, "POST", f"/v1/calls/{call_id}/stream", {"action": "stop"})
    assert status == 200 and body["stopped"] == 0, body
    await farm.hangup(cid)
    await farm.wait(cid, "disconnected", 10)
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    assert final_events(rec.events)[0].kind == "call.completed"


async def test_socket_that_never_answers_posts_stream_error_and_the_call_goes_on(
    phone_farm, voice_app, receiver, gateway_factory, ws_agents  # noqa: F811
):
    """A server that accepts TCP and never answers the upgrade: the gateway gives up (at most
    three attempts within its retry window), posts stream-error, and the document goes on."""
    rec, events_url = receiver
    silent = await ws_agents.silent()
    status = await ws_agents.agent(secret=voice_app.secret)  # takes the status POSTs

    def app(req: web.Request, form: dict[str, str]) -> Any:
        if req.path == "/after":
            return doc({"say": {"text": "Sorry."}}, {"hangup": {}})
        return doc({"stream": {"url": silent.url(), "connect": True,
                               "statusCallback": status.status_url}},
                   {"redirect": {"url": "/after"}})

    voice_app.script = app
    gw = gateway(gateway_factory, voice_app, events_url, STREAMS_CFG)
    farm, cid, t_answer = await caller(phone_farm, gw)
    error = await status.wait_status("stream-error", 15)
    after = await wait_request(voice_app, "/after", 5)
    assert error.signature_ok, error.headers
    assert error.body.get("error"), error.body
    assert error.body["streamUrl"] == silent.url(), error.body
    assert 1 <= len(silent.connections) <= 3, silent.connections
    assert silent.received and b"Upgrade" in b"".join(silent.received)[:2000]
    # connect timeout 1 s, at most two retries within 5 s: the document went on within ~9 s
    assert after["at"] - t_answer < 9.0, after["at"] - t_answer
    assert not [p for p in status.status if p.body.get("event") == "stream-started"]
    await farm.wait(cid, "disconnected", 10)
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    assert final_events(rec.events)[0].kind == "call.completed", dump(rec.events)
