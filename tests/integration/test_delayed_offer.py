"""Delayed offer (an INVITE without SDP): our 200 carries the offer, the ACK the answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import dump, final_events, sipp

pytestmark = pytest.mark.integration
SIPP = Path(__file__).parent / "sipp"


def gateway(gateway_factory, voice_app, events_url):
    return gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                           events_url=events_url)


async def test_answer_in_the_ack_runs_the_document(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}
    gw = gateway(gateway_factory, voice_app, events_url)
    _, ok, failed, out = await sipp(SIPP / "delayed_offer_sdp_ack.xml", gw.sip_port, timeout=20)
    assert (ok, failed) == (1, 0), out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 1, 10)
    (final,) = final_events(rec.events)
    assert final.kind == "call.completed", dump(rec.events)
    assert len(voice_app.requests) == 1


async def test_no_answer_in_the_ack_ends_the_call_cleanly(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}
    gw = gateway(gateway_factory, voice_app, events_url)
    # SIPp fails the call unless the gateway sends BYE within 15 s.
    _, ok, failed, out = await sipp(SIPP / "delayed_offer_no_sdp.xml", gw.sip_port, timeout=20)
    assert (ok, failed) == (1, 0), out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) >= 1, 10)
    (final,) = final_events(rec.events)
    assert final.kind == "call.failed", dump(rec.events)
    assert final.body["data"]["reason"] == "sdp_missing", dump(rec.events)
