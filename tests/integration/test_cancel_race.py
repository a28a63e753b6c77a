"""CANCEL 5 ms after the INVITE: SIP says 487, so the final event says canceled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import dump, final_events, sipp

pytestmark = pytest.mark.integration

SIPP_DIR = Path(__file__).parent / "sipp"


async def test_cancel_5ms_after_invite_is_reported_canceled(
    voice_app, receiver, gateway_factory, tmp_path
):
    rec, events_url = receiver

    async def script(req: Any, form: dict[str, str]) -> Any:
        await asyncio.sleep(0.5)  # the fetch is still in flight when the CANCEL lands
        return {"actions": [{"say": {"text": "too late"}}]}

    voice_app.script = script
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    code, ok, _, out = await sipp(
        SIPP_DIR / "cancel_5ms.xml", gw.sip_port, timeout=15, cwd=tmp_path
    )
    assert code == 0 and ok == 1, out
    assert await rec.wait_for(lambda evs: final_events(evs), 10), gw.log_text()
    await asyncio.sleep(0.5)
    finals = final_events(rec.events)
    assert len(finals) == 1, dump(rec.events)
    data = finals[0].body["data"]
    assert finals[0].kind == "call.failed" and data["status"] == "canceled", data
    assert data["sip_code"] == 487 and data["reason"] == "caller_canceled", data
