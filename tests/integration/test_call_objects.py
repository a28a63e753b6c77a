"""pjsua2 Call objects of finished calls are deleted (by the pump thread), none kept for ever."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.integration


async def test_finished_calls_leave_no_pjsua2_objects(phone, voice_app, receiver,
                                                      gateway_factory):
    _, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    for _ in range(6):
        call = phone.make_call(gw.uri)
        await asyncio.wait_for(call.wait_ended(), 10)
    for _ in range(40):
        if not phone._graveyard and not phone.calls:
            break
        await asyncio.sleep(0.1)
    assert not phone.calls and not phone._graveyard, (phone.calls, phone._graveyard)
    assert phone.admission.media_calls == 0 and phone.admission.inbound == 0
