"""getDigits on real calls: RFC 4733 (SIPp pcaps, a pjsua2 phone) and SIP INFO."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from tests.integration.conftest import final_events, sipp

pytestmark = pytest.mark.integration
SIPP_DIR = Path(__file__).parent / "sipp"


def digits_app(first_doc: dict) -> tuple[list[str], object]:
    got: list[str] = []

    def script(req: web.Request, form: dict[str, str]) -> dict:
        if "Digits" in form:
            got.append(form["Digits"])
            return {"actions": [{"hangup": {}}]}
        return first_doc

    return got, script


async def test_all_twelve_rfc4733_digits_from_sipp_pcaps(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    got, script = digits_app({"actions": [
        {"getDigits": {"numDigits": 12, "finishOnKey": "", "timeout": 8}}]})
    voice_app.script = script
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    code, _, _, out = await sipp(SIPP_DIR / "dtmf_rfc4733_all.xml", gw.sip_port, timeout=40)
    assert got == ["1234567890*#"], (got, out, gw.log_text()[-3000:])
    assert code == 0, out
    assert await rec.wait_for(lambda evs: final_events(evs), 10)
    assert final_events(rec.events)[0].kind == "call.completed"


@pytest.mark.parametrize("method", ["rfc4733", "sip_info"])
async def test_digits_with_nested_prompt_barge_in(method, phone, voice_app, receiver,
                                                  gateway_factory):
    rec, events_url = receiver
    got, script = digits_app({"actions": [
        {"getDigits": {"timeout": 5, "finishOnKey": "#", "nested": [
            {"say": {"text": "Welcome. Press one for sales, two for support, then the hash key. "
                     "This message is long so that the caller interrupts it."}}]}},
        {"say": {"text": "We did not get your choice."}},
    ]})
    voice_app.script = script
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    call = phone.make_call(gw.uri)
    await asyncio.wait_for(call.answer(), 10)
    await asyncio.sleep(1.0)  # mid-prompt
    call.send_dtmf("42#", method)
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert got == ["42"], got
    assert end.by == "remote"
    # Barge-in: the call ended well before the long prompt could have played out.
    assert end.ended_at - call.answered_at < 4.0
    assert await rec.wait_for(lambda evs: final_events(evs), 10)


async def test_no_digits_before_timeout_runs_next_action(phone, voice_app, receiver,
                                                         gateway_factory):
    _, events_url = receiver
    got, script = digits_app({"actions": [
        {"getDigits": {"timeout": 1, "numDigits": 1}},
        {"hangup": {}},
    ]})
    voice_app.script = script
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    call = phone.make_call(gw.uri)
    await asyncio.wait_for(call.answer(), 10)
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert got == [] and len(voice_app.requests) == 1
    assert 0.8 < end.ended_at - call.answered_at < 3.0


async def test_one_press_sent_two_ways_counts_once(phone, voice_app, receiver, gateway_factory):
    _, events_url = receiver
    got, script = digits_app({"actions": [{"getDigits": {"timeout": 3, "finishOnKey": "#"}}]})
    voice_app.script = script
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    call = phone.make_call(gw.uri)
    await asyncio.wait_for(call.answer(), 10)
    await asyncio.sleep(0.3)
    for d in "57":  # a trunk that signals every press as RFC 4733 and as SIP INFO
        call.send_dtmf(d, "rfc4733")
        call.send_dtmf(d, "sip_info")
        await asyncio.sleep(0.4)
    call.send_dtmf("#", "rfc4733")
    call.send_dtmf("#", "sip_info")
    await asyncio.wait_for(call.wait_ended(), 10)
    assert got == ["57"], got
