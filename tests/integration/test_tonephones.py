"""The phone farm itself: two farms call each other; tones cross; early media; busy."""

from __future__ import annotations

import asyncio

import pytest

from tests import tones
from tests.integration.tonephones import phone_farm  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


async def test_two_farms_hear_each_other_and_early_media(phone_farm):  # noqa: F811
    a = await phone_farm(tone=697)
    b = await phone_farm()
    c1 = await a.call(b.uri("answer-941"), 697)
    c2 = await a.call(b.uri("early-1209-1.0"), 770)
    c3 = await a.call(b.uri("busy"), 852)
    await a.wait(c1, "answered")
    # An outbound leg has media in EARLY state (183 with SDP): before its answer.
    early_media = await a.wait(c2, "media", 5)
    await a.wait(c2, "answered")
    end3 = await a.wait(c3, "disconnected")
    assert end3["code"] == 486 and end3["wav"] is None
    assert a.of(c2, "early")["code"] == 183
    answered = next(e for e in a.events if e["ev"] == "answered" and e["id"] == c2)
    assert a.events.index(early_media) < a.events.index(answered)
    b1 = (await b.incoming(user="answer-941"))["id"]
    await asyncio.sleep(1.5)
    x, rate = a.recording(c1)
    assert tones.heard(x, rate, start_s=0.3) == {941}, tones.levels(x, rate, start_s=0.3)
    y, rate = b.recording(b1)
    assert tones.heard(y, rate, start_s=0.3) == {697}, tones.levels(y, rate, start_s=0.3)
    z, rate = a.recording(c2)
    assert tones.hears(z, rate, 1209, 0.2, 0.9)  # the early media, before the answer
    await a.send_dtmf(c1, "5")
    assert (await b.wait(b1, "dtmf"))["digit"] == "5"
    await a.hangup(c1)
    end = await b.wait(b1, "disconnected")
    assert end["wav"] and end["by"] == "remote"
    await a.wait(c1, "disconnected")


async def test_farm_behaviours_ring_cancel_reject_and_hangup_after(phone_farm):  # noqa: F811
    b = await phone_farm(behaviours={"+254711000002": {"do": "answer", "tone": 852,
                                                       "after": 0.2, "hangup_after": 0.5}})
    a = await phone_farm()
    ring = await a.call(b.uri("ring"), 697)
    rej = await a.call(b.uri("reject-503"), 697)
    mapped = await a.call(b.uri("+254711000002"), 697)
    assert (await a.wait(ring, "early"))["code"] == 180
    assert (await a.wait(rej, "disconnected"))["code"] == 503
    await a.wait(mapped, "answered")
    end = await a.wait(mapped, "disconnected", 5)
    assert end["by"] == "remote" and end["wav"]
    await a.hangup(ring)  # CANCEL of a ringing call
    end = await a.wait(ring, "disconnected")
    assert end["by"] == "local"  # its code: what PJSIP reports locally (603 or the 487)
    inc = await b.incoming(user="ring")
    assert (await b.wait(inc["id"], "disconnected"))["code"] == 487
    assert (await b.incoming(user="+254711000002"))["request_uri"].startswith("sip:+2547")
