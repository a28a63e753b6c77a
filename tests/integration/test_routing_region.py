"""`[routing] default_region` reaches the worker: a dialled national form is read in that
region (real SIP call into a one-worker gateway, real voice app on loopback)."""

from __future__ import annotations

import asyncio

from tests.integration.conftest import NUMBER

NG_NUMBER = "+2348031234567"
NG_CONFIG = f"""
[routing]
default_region = "NG"
[[numbers]]
e164 = "{NG_NUMBER}"
number_id = "num_ng"
workspace_id = "ws_1"
voice_callback_url = "{{voice_url}}"
webhook_secret = "{{secret}}"
"""


async def test_national_forms_are_read_in_the_configured_region(
    phone, voice_app, receiver, gateway_factory
):
    _, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    voice_url = f"{voice_app.base_url}/voice"
    gw = gateway_factory(
        voice_url=voice_url, app_secret=voice_app.secret, events_url=events_url,
        extra=NG_CONFIG.format(voice_url=voice_url, secret=voice_app.secret),
    )
    # Nigeria's national form of the NG number reaches its voice app, as E.164.
    call = phone.make_call(f"sip:08031234567@127.0.0.1:{gw.sip_port}")
    await asyncio.wait_for(call.wait_ended(), 10)
    assert [(r["form"]["to"], r["form"]["numberId"]) for r in voice_app.requests] == [
        (NG_NUMBER, "num_ng")
    ]
    # Kenya's national form of NUMBER is not Kenyan under "NG": 404, the voice app not asked.
    call = phone.make_call(f"sip:0{NUMBER[4:]}@127.0.0.1:{gw.sip_port}")
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert end.sip_code == 404
    assert len(voice_app.requests) == 1
    # Written with its country code it still routes.
    call = phone.make_call(f"sip:{NUMBER}@127.0.0.1:{gw.sip_port}")
    await asyncio.wait_for(call.wait_ended(), 10)
    assert [r["form"]["numberId"] for r in voice_app.requests][1:] == ["num_1"]
