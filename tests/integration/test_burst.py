"""Bursts of simultaneous calls: every free slot is used, every call.started gets one final."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.conftest import dump, final_events, sipp
from tests.integration.test_node_pool import pool_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CARRIER = Path(__file__).parent / "sipp" / "node_carrier.xml"


def one_final_each(events) -> tuple[set[str], Counter[str]]:
    started = {e.body["data"]["call_id"] for e in events if e.kind == "call.started"}
    finals = Counter(e.body["data"]["call_id"] for e in final_events(events))
    return started, finals


async def test_burst_uses_every_free_slot(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 3}}, {"hangup": {}}]}
    gw = pool_gateway(gateway_factory, voice_app, events_url, reserved=1)  # 3 x 3 = 9 slots
    # 40 INVITEs at once: 9 answered, the rest refused 503 by the front once all are full.
    # Three waves: each reuses the pjsua call ids that the previous one's refusals churned.
    for wave in range(1, 4):
        _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=40, limit=40, rate=1000,
                                        timeout=30)
        assert (ok, failed) == (9, 31), f"wave {wave}: {out}"
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 27, 10)
    await asyncio.sleep(0.5)
    started, finals = one_final_each(rec.events)
    assert len(started) == 27 and set(finals) == started, dump(rec.events)
    assert set(finals.values()) == {1}, dump(rec.events)


async def test_burst_of_28_calls_each_gets_one_final(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 2}}, {"hangup": {}}]}
    gw = pool_gateway(gateway_factory, voice_app, events_url, workers=7)  # 7 x 4 = 28 slots
    for _ in range(2):  # the second wave reuses call ids the first one just freed
        _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=28, limit=28, rate=1000,
                                        timeout=30)
        assert (ok, failed) == (28, 0), out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 56, 10)
    await asyncio.sleep(0.5)
    started, finals = one_final_each(rec.events)
    assert len(started) == 56 and set(finals) == started, dump(rec.events)
    assert set(finals.values()) == {1}
    assert {e.kind for e in final_events(rec.events)} == {"call.completed"}
