"""The browser harness on its own, no SIP: the phone page served like the demo routes serve it,
loaded in headless Chromium with an 852 Hz fake microphone, and an in-page WebRTC loopback
(two RTCPeerConnections, PCMU as toward the gateway) whose remote track goes through the same
capture path as a SIP call's; the test hears the microphone's tone in what the page captured."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web

from gateway.webrtc.assets import CONTENT_TYPES, JSSIP_BUNDLE, asset
from tests.integration.browser import BrowserPhone, skip_unless_browser, tone_wav
from tests.tones import TEST_TONES, heard, levels

pytestmark = [pytest.mark.integration, pytest.mark.browser]

MIC_HZ = 852
_until_registered = """new Promise((resolve) => { const t = setInterval(async () => {
    if ((await sautiPhone.state()).registered) { clearInterval(t); resolve(true); } }, 20); })"""
_until_unregistered = _until_registered.replace(").registered)", ").registered === false)")


async def _serve(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name", "phone.html")
    path = asset(name)
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES[name],
                                           "Cache-Control": "no-store"})


@pytest.fixture
async def site() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/demo/phone", _serve)
    app.router.add_get("/demo/phone/", _serve)
    app.router.add_get("/demo/phone/{name}", _serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def phone(tmp_path: Path) -> AsyncIterator[BrowserPhone]:
    skip_unless_browser()
    assert JSSIP_BUNDLE.is_file(), f"{JSSIP_BUNDLE} missing: run scripts/setup.sh (esbuild step)"
    mic = tone_wav(tmp_path / "mic.wav", MIC_HZ)
    p = await BrowserPhone.launch(mic, tmp_path / "browser.log")
    try:
        yield p
    finally:
        await p.close()


def test_assets_resolve() -> None:
    for name in ("phone.html", "phone.js"):
        assert asset(name) is not None, name
    assert asset("../assets.py") is None
    assert asset("nope.js") is None


async def test_page_loopback_hears_the_microphone(site: str, phone: BrowserPhone) -> None:
    # without the trailing slash too: the page bases its script URLs on its own path
    for url in (f"{site}/demo/phone/", f"{site}/demo/phone?autoanswer=1"):
        got = await phone.goto(url)
        assert got["status"] == 200, got
        assert await phone.eval("JsSIP.version") == "3.13.8"
        assert await phone.eval("typeof sautiPhone.register") == "function"
    status = await phone.eval("document.getElementById('status').textContent")
    assert "Not registered" in status
    st = await phone.eval("sautiPhone.state()")
    assert st["registered"] is False and st["inCall"] is False

    res = await phone.eval("sautiPhone._selfTest()")
    assert res["ok"] is True and res["codec"] == "PCMU", res
    await asyncio.sleep(2.5)
    samples, rate = await phone.heard()
    assert rate in (44100, 48000), rate
    assert len(samples) >= 2.0 * rate, len(samples) / rate
    lv = levels(samples, rate, TEST_TONES, start_s=1.0)
    assert heard(samples, rate, TEST_TONES, start_s=1.0) == {MIC_HZ}, lv
    # the -10 dBFS tone through PCMU arrives at about -10 dBFS
    assert lv[MIC_HZ] > -16, lv
    t = await phone.eval("sautiPhone.timings()")
    assert t["first_audio_ms"] is not None and 0 < t["first_audio_ms"] < 5000, t

    await phone.eval("sautiPhone.clearHeard()")
    await asyncio.sleep(0.5)
    again, _ = await phone.heard()
    assert 0.2 * rate < len(again) < 2.0 * rate


class FakeRegistrar:
    """A SIP-over-websocket stand-in for the front (RFC 7118 framing, no media): REGISTER is
    answered 200 with `Contact;expires=GRANTED` if it carries `Authorization: Bearer <good>`,
    else 403; INVITE is answered 486 (the page's failure path), or with `relay` everything else
    goes to the other connected socket (two pages calling each other, media peer to peer).
    Keeps what it received."""

    GRANTED = 120

    def __init__(self, good: set[str], relay: bool = False) -> None:
        self.good = good
        self.relay = relay  # forward everything but REGISTER to the other socket(s)
        self.received: list[str] = []
        self.sockets: set[web.WebSocketResponse] = set()

    @staticmethod
    def _headers(msg: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in msg.split("\r\n")[1:]:
            if not line:
                break
            name, _, value = line.partition(":")
            out.setdefault(name.strip().lower(), value.strip())
        return out

    def _response(self, msg: str, code: int, reason: str, contact: bool) -> str:
        h = self._headers(msg)
        lines = [f"SIP/2.0 {code} {reason}", f"Via: {h['via']}", f"From: {h['from']}",
                 f"To: {h['to']};tag=fake{code}", f"Call-ID: {h['call-id']}",
                 f"CSeq: {h['cseq']}"]
        if contact:
            expires = 0 if "expires=0" in h.get("contact", "") else self.GRANTED
            lines.append(f"Contact: {h['contact'].split(';expires=')[0]};expires={expires}")
        return "\r\n".join([*lines, "Content-Length: 0", "", ""])

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("sip",))
        await ws.prepare(request)
        self.sockets.add(ws)
        async for frame in ws:
            msg = str(frame.data)
            self.received.append(msg)
            method = msg.split(" ", 1)[0]
            auth = self._headers(msg).get("authorization", "")
            if method == "REGISTER" and not msg.startswith("SIP/2.0"):
                ok = auth.removeprefix("Bearer ") in self.good
                await ws.send_str(self._response(msg, 200, "OK", True) if ok
                                  else self._response(msg, 403, "Forbidden", False))
            elif self.relay:
                for other in self.sockets - {ws}:
                    await other.send_str(msg)
            elif method == "INVITE":
                await ws.send_str(self._response(msg, 486, "Busy Here", False))
        self.sockets.discard(ws)
        return ws


async def test_page_register_refresh_and_refusals(site: str, phone: BrowserPhone) -> None:
    reg = FakeRegistrar({"tok-1", "tok-2"})
    app = web.Application()
    app.router.add_get("/ws", reg.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    ws_url = f"ws://127.0.0.1:{runner.addresses[0][1]}/ws"
    try:
        await phone.goto(f"{site}/demo/phone")
        opts = {"endpoint": ws_url, "uri": "sip:alice@127.0.0.1", "displayName": "Alice"}

        bad = await phone.eval(f"sautiPhone.register({json.dumps({**opts, 'token': 'nope'})})")
        assert bad["ok"] is False and bad["code"] == 403 and bad["reason"] == "Rejected", bad

        res = await phone.eval(f"sautiPhone.register({json.dumps({**opts, 'token': 'tok-1'})})")
        assert res["ok"] is True and res["code"] == 200, res
        assert res["expires"] == FakeRegistrar.GRANTED, res
        assert 0 <= res["rtt_ms"] < 2000, res
        first = next(m for m in reversed(reg.received) if m.startswith("REGISTER"))
        assert "\r\nAuthorization: Bearer tok-1\r\n" in first
        assert "\r\nUser-Agent: Sautikit browser phone\r\n" in first
        assert (await phone.eval("sautiPhone.state()"))["registered"] is True

        again = await phone.eval("sautiPhone.refresh('tok-2')")
        assert again["ok"] is True and again["code"] == 200, again
        assert again["expires"] == FakeRegistrar.GRANTED, again
        refused = await phone.eval("sautiPhone.refresh('expired')")
        assert refused["ok"] is False and refused["code"] == 403, refused
        assert (await phone.eval("sautiPhone.state()"))["registered"] is False

        await phone.eval("sautiPhone.setToken('tok-2')")
        call = await phone.eval("sautiPhone.call('+254700000001', {headers: ['X-Test: 1']})")
        assert call == {"ok": False, "code": 486, "reason": "Busy"}, call
        invite = next(m for m in reg.received if m.startswith("INVITE"))
        assert invite.startswith("INVITE sip:+254700000001@127.0.0.1 SIP/2.0")
        assert "\r\nAuthorization: Bearer tok-2\r\n" in invite and "\r\nX-Test: 1\r\n" in invite
        assert (await phone.eval("sautiPhone.ended()"))["cause"] == "Busy"
        assert (await phone.eval("sautiPhone.hangup()"))["ok"] is True  # nothing to hang up

        ok = await phone.eval(f"sautiPhone.register({json.dumps({**opts, 'token': 'tok-2'})})")
        assert ok["ok"] is True, ok
        assert (await phone.eval("sautiPhone.unregister()"))["ok"] is True
        last = [m for m in reg.received if m.startswith("REGISTER")][-1]
        assert ";expires=0" in last
        types = [e["type"] for e in (await phone.eval("sautiPhone.state()"))["events"]]
        assert "registration_failed" in types and "unregistered" in types, types

        # the front drops the websocket: JsSIP reconnects and the page registers again
        ok = await phone.eval(f"sautiPhone.register({json.dumps({**opts, 'token': 'tok-2'})})")
        assert ok["ok"] is True, ok
        n = sum(m.startswith("REGISTER") for m in reg.received)
        for ws in list(reg.sockets):
            await ws.close()
        await phone.eval(_until_unregistered, timeout=5)
        await phone.eval(_until_registered, timeout=15)
        assert sum(m.startswith("REGISTER") for m in reg.received) == n + 1
        assert (await phone.eval("sautiPhone.unregister()"))["ok"] is True

        # what a developer opens: the parameters in the query, or the mint's JSON in the hash
        mint = {"token": "tok-1", "endpoint": ws_url, "protocol": "sip", "expiresIn": 300,
                "sipProfile": {"uri": "sip:bob@127.0.0.1", "display_name": "Bob"}}
        for url in (f"{site}/demo/phone?{urlencode({**opts, 'token': 'tok-2'})}",
                    f"{site}/demo/phone#{quote(json.dumps(mint))}"):
            await phone.goto(url)
            await phone.eval(_until_registered, timeout=10)
            status = await phone.eval("document.getElementById('status').textContent")
            assert status.startswith("Registered as sip:"), status
        assert "\r\nFrom: \"Bob\" <sip:bob@127.0.0.1>" in reg.received[-1]
    finally:
        assert (await phone.eval("sautiPhone.stop()"))["ok"] is True  # the websocket closes
        for ws in list(reg.sockets):
            await ws.close()
        await runner.cleanup()


@pytest.fixture
async def relay() -> AsyncIterator[tuple[FakeRegistrar, str]]:
    reg = FakeRegistrar({"tok-a", "tok-b"}, relay=True)
    app = web.Application()
    app.router.add_get("/ws", reg.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield reg, f"ws://127.0.0.1:{runner.addresses[0][1]}/ws"
    finally:
        for ws in list(reg.sockets):
            await ws.close()
        await runner.cleanup()


async def test_two_pages_call_each_other(site: str, relay: tuple[FakeRegistrar, str],
                                         tmp_path: Path) -> None:
    """The SIP call path of the page (call, autoAnswer/incoming, the session's capture, timings,
    hangup/ended) between two Chromiums, each with its own tone, through a relaying fake."""
    skip_unless_browser()
    reg, ws_url = relay
    a_hz, b_hz = 852, 1209
    a = await BrowserPhone.launch(tone_wav(tmp_path / "a.wav", a_hz), tmp_path / "a.log")
    try:
        b = await BrowserPhone.launch(tone_wav(tmp_path / "b.wav", b_hz), tmp_path / "b.log")
        try:
            for p, user, tok in ((a, "alice", "tok-a"), (b, "bob", "tok-b")):
                await p.goto(f"{site}/demo/phone")
                opts = {"token": tok, "endpoint": ws_url, "uri": f"sip:{user}@127.0.0.1"}
                res = await p.eval(f"sautiPhone.register({json.dumps(opts)})")
                assert res["ok"] is True, (user, res)
            await b.eval("sautiPhone.autoAnswer(true)")
            inc = asyncio.ensure_future(b.eval("sautiPhone.incoming()", timeout=20))
            res = await a.eval("sautiPhone.call('sip:bob@127.0.0.1', {codecs: ['PCMU']})",
                               timeout=20)
            assert res == {"ok": True}, res
            offer = next(m for m in reg.received if m.startswith("INVITE"))
            mline = next(x for x in offer.split("\r\n") if x.startswith("m=audio"))
            assert mline.split()[2] == "UDP/TLS/RTP/SAVPF", mline  # DTLS-SRTP toward the front
            pts = mline.split()[3:]
            assert pts[0] == "0" and all(
                f"a=rtpmap:{pt} telephone-event/" in offer for pt in pts[1:]), mline
            got = await inc
            assert got["ok"] is True and got["from"].startswith("sip:alice@"), got
            await asyncio.sleep(3.0)
            for p, mine, theirs in ((a, a_hz, b_hz), (b, b_hz, a_hz)):
                x, rate = await p.heard()
                lv = levels(x, rate, TEST_TONES, start_s=1.0)
                assert heard(x, rate, TEST_TONES, start_s=1.0) == {theirs}, (mine, lv)
            t = await a.eval("sautiPhone.timings()")
            print("timings", t)
            assert t["invite_ms"] == 0 and 0 < t["answered_ms"] < 5000, t
            assert t["first_audio_ms"] is not None and t["first_audio_ms"] < 5000, t
            st = await a.eval("sautiPhone.state()")
            assert st["inCall"] is True, st
            # the caller hangs up; the callee sees the BYE
            ended_b = asyncio.ensure_future(b.eval("sautiPhone.ended()"))
            assert (await a.eval("sautiPhone.hangup()"))["ok"] is True
            end = await ended_b
            assert end["originator"] == "remote" and end["cause"] == "Terminated", end
            assert (await b.eval("sautiPhone.state()"))["inCall"] is False
            for p in (a, b):
                assert (await p.eval("sautiPhone.stop()"))["ok"] is True
        finally:
            await b.close()
    finally:
        await a.close()
