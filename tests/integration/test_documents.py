"""Documents that must fail the call with a reason that says what happened (real call, real app)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from tests.integration.conftest import dump, final_events
from tests.unit.test_metrics import parse

pytestmark = pytest.mark.integration

# 30 000 deep fits the 64 KiB document limit; json.loads alone would raise RecursionError.
DEEP = '{"actions": [{"say": {"text": "x", "voice": ' + "[" * 30_000 + "]" * 30_000 + "}}]}"


@pytest.mark.parametrize(
    ("document", "reason", "in_message", "answered"),
    [
        # No trunk: each dial fails at once, and the app answers every dial's callback with
        # the same document: the dial cap ends it.
        ({"actions": [{"say": {"text": "hi"}}, {"dial": {"number": "0712345678"}}]},
         "dial_loop", "more than 10 dials", True),
        ({"actions": []}, "document_empty", "no actions", False),
        (DEEP, "document_invalid", "32", False),
    ],
)  # fmt: skip
async def test_document_fails_the_call_with_its_reason(
    document, reason, in_message, answered, phone, voice_app, receiver, gateway_factory
):
    rec, events_url = receiver

    async def script(req: web.Request, form: dict[str, str]) -> Any:
        if isinstance(document, str):
            return web.Response(text=document, content_type="application/json")
        return document

    voice_app.script = script
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    call = phone.make_call(gw.uri)
    if answered:
        await asyncio.wait_for(call.answer(), 10)
    end = await asyncio.wait_for(call.wait_ended(), 20)
    assert end.was_answered is answered
    if not answered:
        assert end.sip_code == 500, end
    assert await rec.wait_for(lambda evs: final_events(evs), 10), gw.log_text()
    await asyncio.sleep(0.3)
    finals = final_events(rec.events)
    assert len(finals) == 1, dump(rec.events)
    assert finals[0].kind == "call.failed", dump(rec.events)
    data = finals[0].body["data"]
    assert data["status"] == "failed" and data["reason"] == reason, data
    assert in_message in data["message"], data


async def test_skipped_play_is_logged_and_counted(voice_app, receiver, gateway_factory):
    """A play whose URL 404s is skipped (the call goes on and completes); the skip is logged
    with the call id and counted in /metrics."""
    from pathlib import Path

    import aiohttp

    from tests.integration.conftest import sipp

    rec, events_url = receiver

    def script(req, form):
        if req.path == "/missing.wav":
            return web.Response(status=404)
        return {"actions": [{"play": {"url": f"{voice_app.base_url}/missing.wav"}},
                            {"hangup": {}}]}

    voice_app.script = script
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    scenario = Path(__file__).parent / "sipp" / "answered_bye.xml"
    _, ok, failed, out = await sipp(scenario, gw.sip_port, timeout=20)
    assert (ok, failed) == (1, 0), out
    assert await rec.wait_for(lambda evs: final_events(evs), 10)
    final = final_events(rec.events)[0]
    assert final.kind == "call.completed", dump(rec.events)
    call_id = final.body["data"]["call_id"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.api_port}/metrics") as r:
            text = await r.text()
    skipped = parse(text)["sautikit_actions_skipped_total"]
    assert skipped.get(verb="play", reason="media_fetch_failed") == 1
    assert any(f"call {call_id}" in ln and "media_fetch_failed" in ln
               for ln in gw.log_text().splitlines())
