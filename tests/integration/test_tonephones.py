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
