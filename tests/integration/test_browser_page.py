"""The browser harness on its own, no SIP: the phone page served like the demo routes serve it,
loaded in headless Chromium with an 852 Hz fake microphone, and an in-page WebRTC loopback
(two RTCPeerConnections, PCMU as toward the gateway) whose remote track goes through the same
capture path as a SIP call's; the test hears the microphone's tone in what the page captured."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.webrtc.assets import CONTENT_TYPES, JSSIP_BUNDLE, asset
from tests.integration.browser import BrowserPhone, skip_unless_browser, tone_wav
from tests.tones import TEST_TONES, heard, levels

pytestmark = pytest.mark.integration

MIC_HZ = 852


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
