"""MixGraph and MediaLink on real pjsua2: who hears whom, measured on the phones' audio.

The test process's endpoint (the `phone` fixture) answers two calls from a phone farm (tones
697 and 941) and bridges them: directly with a MixGraph, then muted one way, then through two
MediaLinks connected to each other over loopback UDP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from media.call import SipCall
from media.link import MediaLink, release_closed
from media.mixgraph import Member, MixGraph, bridge_edges, room_edges
from tests import tones
from tests.integration.tonephones import PhoneFarm, phone_farm  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

A_HZ, B_HZ = 697, 941
SETTLE_S = 0.3  # edges take effect on the next tick; RTP and the recorder lag a little
PHASE_S = 1.2


@pytest.fixture
async def answered_pair(phone, phone_farm) -> AsyncIterator[tuple[PhoneFarm, Any]]:  # noqa: F811
    """Two farm calls to `phone`, answered: (farm, {"a": (farm id, SipCall), "b": ...})."""
    farm: PhoneFarm = await phone_farm()
    got: asyncio.Queue[SipCall] = asyncio.Queue()
    phone.on_incoming = lambda call, invite: got.put_nowait(call)
    try:
        ca = await farm.call(f"sip:a@{phone.host_port}", A_HZ)
        sa = await asyncio.wait_for(got.get(), 5)
        cb = await farm.call(f"sip:b@{phone.host_port}", B_HZ)
        sb = await asyncio.wait_for(got.get(), 5)
        await asyncio.gather(sa.answer(), sb.answer())
        await asyncio.gather(farm.wait(ca, "answered"), farm.wait(cb, "answered"))
        yield farm, {"a": (ca, sa), "b": (cb, sb)}
    finally:
        phone.on_incoming = None
        for call in [c for c in (locals().get("sa"), locals().get("sb")) if c is not None]:
            await call.hangup()


def heard(farm: PhoneFarm, cid: str, t0: float, t1: float) -> tuple[set[float], dict[float, float]]:
    x, rate = farm.recording(cid)
    a, b = farm.offset(cid, t0) + SETTLE_S, farm.offset(cid, t1)
    assert (b - a) * rate > 0.5 * rate and len(x) >= b * rate - 0.1 * rate, (a, b, len(x) / rate)
    return (tones.heard(x, rate, [A_HZ, B_HZ], a, b),
            {f: round(v, 1) for f, v in tones.levels(x, rate, [A_HZ, B_HZ], a, b).items()})


async def hang_up(farm: PhoneFarm, *cids: str) -> None:
    for cid in cids:
        await farm.hangup(cid)
    for cid in cids:
        await farm.wait(cid, "disconnected")


async def phase(seconds: float = PHASE_S) -> tuple[float, float]:
    t0 = time.time()
    await asyncio.sleep(seconds)
    return t0, time.time()


async def test_bridge_mute_and_link(phone, answered_pair):
    farm, calls = answered_pair
    (ca, sa), (cb, sb) = calls["a"], calls["b"]
    g = MixGraph()
    g.add("a", sa.audio_media())
    g.add("b", sb.audio_media())

    # Nothing connected: neither hears anything.
    t_idle = await phase(0.8)

    g.set_edges(bridge_edges("a", "b"))
    assert g.edges == {("a", "b"): 1.0, ("b", "a"): 1.0}
    t_bridge = await phase()

    # A connection's level (startTransmit2): b heard at a quarter amplitude (-12 dB).
    g.set_edges({("a", "b"): 1.0, ("b", "a"): 0.25})
    assert g.edges == {("a", "b"): 1.0, ("b", "a"): 0.25}
    t_level = await phase()

    # a muted (speak=False): b no longer hears a's tone; a still hears b.
    g.set_edges(room_edges({"a": Member(speak=False), "b": Member()}))
    assert g.edges == {("b", "a"): 1.0}
    t_mute = await phase()

    # Through two links over loopback UDP: a -> L1 ~> L2 -> b and b -> L2 ~> L1 -> a.
    rate = phone.cfg.clock_rate
    l1, l2 = MediaLink(rate), MediaLink(rate)
    l1.connect(l2.local_addr)
    l2.connect(l1.local_addr)
    g.add("L1", l1.audio_media)
    g.add("L2", l2.audio_media)
    g.set_edges({("a", "L1"): 1.0, ("L2", "b"): 1.0, ("b", "L2"): 1.0, ("L1", "a"): 1.0})
    t_link = await phase()
    s1, s2 = l1.stats(), l2.stats()

    g.remove("L1")
    g.remove("L2")
    assert g.edges == {("b", "L2"): 1.0} or g.edges == {}
    l1.close()
    l2.close()
    t_after = await phase(0.8)
    await hang_up(farm, ca, cb)  # the recordings are complete (and their headers) once over

    spans = {"idle": t_idle, "bridge": t_bridge, "level": t_level, "mute": t_mute,
             "link": t_link, "after": t_after}
    results = {name: (heard(farm, ca, *t), heard(farm, cb, *t)) for name, t in spans.items()}
    msg = str(results)
    print(msg, s1, s2)
    assert results["idle"][0][0] == set() and results["idle"][1][0] == set(), msg
    # Each hears the other, never itself (the endpoint does not echo).
    assert results["bridge"][0][0] == {B_HZ} and results["bridge"][1][0] == {A_HZ}, msg
    drop = results["bridge"][0][1][B_HZ] - results["level"][0][1][B_HZ]
    assert 10 < drop < 14 and results["level"][1][0] == {A_HZ}, msg
    assert results["mute"][0][0] == {B_HZ} and results["mute"][1][0] == set(), msg
    assert results["link"][0][0] == {B_HZ} and results["link"][1][0] == {A_HZ}, msg
    assert results["after"][0][0] == set() and results["after"][1][0] == set(), msg
    # Frames both ways: ~50 per second each, nearly all played, nothing malformed.
    for s in (s1, s2):
        assert s.sent > 40 * PHASE_S and s.received > 40 * PHASE_S, (s1, s2)
        assert s.played > 40 * PHASE_S and s.errors == 0, (s1, s2)
    assert l1.closed and l2.closed
    release_closed()


async def test_links_close_and_recreate_under_traffic(phone, answered_pair):
    """Links made and closed while frames flow: no crash, and the last pair still carries."""
    farm, calls = answered_pair
    (ca, sa), (_cb, sb) = calls["a"], calls["b"]
    g = MixGraph()
    g.add("a", sa.audio_media())
    g.add("b", sb.audio_media())
    rate = phone.cfg.clock_rate
    for i in range(8):
        l1, l2 = MediaLink(rate), MediaLink(rate)
        l1.connect(l2.local_addr)
        l2.connect(l1.local_addr)
        g.add("L1", l1.audio_media)
        g.add("L2", l2.audio_media)
        g.set_edges({("b", "L2"): 1.0, ("L1", "a"): 1.0})
        await asyncio.sleep(0.1 if i < 7 else PHASE_S)
        if i < 7:
            g.remove("L1")
            g.remove("L2")
            l1.close()
            l2.close()
    t1 = time.time()
    g.clear()
    l1.close()
    l2.close()
    await hang_up(farm, ca, _cb)
    got, lv = heard(farm, ca, t1 - PHASE_S + 0.2, t1)
    assert got == {B_HZ}, lv
    await asyncio.sleep(1.2)  # past RELEASE_DELAY_S: the closed links' ports are deleted
    release_closed()


async def test_tone_ports_cadence(phone, answered_pair):
    """Ringback (Kenya/UK cadence), the hold tone and a beep, as a phone hears them."""
    from media.tones import BEEP_HZ, beep, hold_tone, ringback

    farm, calls = answered_pair
    (ca, sa), (cb, _sb) = calls["a"], calls["b"]
    rate = phone.cfg.clock_rate
    g = MixGraph()
    g.add("a", sa.audio_media())
    ring, hold, bp = ringback(rate), hold_tone(rate), beep(rate)
    try:
        g.add("ring", ring.audio_media)
        g.add("hold", hold.audio_media)
        g.add("beep", bp.audio_media)
        g.set_edges({("ring", "a"): 1.0})
        ring.play()  # from the start of its pattern, now that it is connected
        t_ring = time.time()
        await asyncio.sleep(3.3)
        g.set_edges({("hold", "a"): 1.0})
        hold.play()
        t_hold = time.time()
        await asyncio.sleep(1.2)
        g.set_edges({("beep", "a"): 1.0})
        bp.play()
        t_beep = time.time()
        await asyncio.sleep(0.6)
        g.clear()
    finally:
        await asyncio.sleep(0.1)
        for t in (ring, hold, bp):
            t.close()
    await hang_up(farm, ca, cb)
    x, r = farm.recording(ca)
    on = tones.onset(x, r, 400, after_s=farm.offset(ca, t_ring) - 0.1)
    assert on is not None
    # 0.4 s on, 0.2 off, 0.4 on, 2.0 off (window edges kept 60 ms clear of the switches).
    def lv(f, a, b):
        return tones.levels(x, r, [f], on + a, on + b)[f]
    for f in (400, 450):
        assert lv(f, 0.06, 0.34) > -30 and lv(f, 0.66, 0.94) > -30, f
        assert lv(f, 0.46, 0.54) < -40 and lv(f, 1.1, 2.9) < -40, f
    h = farm.offset(ca, t_hold)
    assert tones.heard(x, r, [440, 554, 400], h + 0.05, h + 0.35) == {440}
    assert tones.heard(x, r, [440, 554, 400], h + 0.5, h + 0.7) == {554}
    b = farm.offset(ca, t_beep)
    assert tones.onset(x, r, BEEP_HZ, after_s=b - 0.05) is not None
    assert not tones.hears(x, r, BEEP_HZ, b + 0.35, b + 0.6)  # once, 200 ms
