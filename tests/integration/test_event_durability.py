"""Billing events survive a receiver outage and a SIGKILLed gateway."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from gateway.demo import EventReceiver, free_port
from tests.integration.conftest import dump, final_events, start_gateway
from tests.integration.test_inbound_call import call_and_listen
from tests.seed_receiver import verify_signature

pytestmark = pytest.mark.integration

DOC = {"actions": [{"say": {"text": "Short."}}, {"hangup": {}}]}


def outbox_counts(storage) -> dict[str, int]:
    from gateway.events.outbox import Outbox

    with Outbox(storage / "outbox.sqlite3") as outbox:
        return outbox.counts()


async def test_receiver_down_then_up_loses_nothing(
    phone, voice_app, receiver, gateway_factory, tmp_path
):
    rec, events_url = receiver
    rec.status = 503
    voice_app.script = lambda req, form: DOC
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice",
        app_secret=voice_app.secret,
        events_url=None,
        control_plane=(events_url, voice_app.secret),
    )
    await call_and_listen(phone, gw.uri, tmp_path / "a.wav")
    await call_and_listen(phone, gw.uri, tmp_path / "b.wav")
    await asyncio.sleep(2.0)  # several failed attempts
    assert rec.events == []
    rec.status = 200
    assert await rec.wait_for(lambda evs: len({e.body["event_id"] for e in evs}) >= 6, 20), dump(
        rec.events
    )
    kinds = sorted(e.kind for e in {e.body["event_id"]: e for e in rec.events}.values())
    assert kinds == sorted(["call.started", "call.answered", "call.completed"] * 2)
    assert all(e.signature_ok for e in rec.events)
    assert all(e.headers["X-Sautikit-Idempotency-Key"] == e.body["event_id"] for e in rec.events)


async def test_sigkilled_gateway_delivers_after_restart(
    phone, voice_app, gateway_factory, tmp_path
):
    # Events go to a port where nothing listens yet.
    port = free_port()
    events_url = f"http://127.0.0.1:{port}/events"
    voice_app.script = lambda req, form: DOC
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice",
        app_secret=voice_app.secret,
        events_url=None,
        control_plane=(events_url, voice_app.secret),
    )
    await call_and_listen(phone, gw.uri, tmp_path / "a.wav")
    deadline = time.monotonic() + 10
    while outbox_counts(gw.storage).get("pending", 0) < 3 and time.monotonic() < deadline:  # noqa: ASYNC110 (polls another process)
        await asyncio.sleep(0.1)
    assert outbox_counts(gw.storage).get("pending") == 3, gw.log_text()
    gw.stop(signal.SIGKILL)
    await asyncio.sleep(1.5)  # the orphaned worker notices its supervisor is gone and exits

    rec = EventReceiver(secret=voice_app.secret, verifier=verify_signature)
    runner, _ = await rec.start(port)
    try:
        gw2 = start_gateway(gw.config, gw.config.parent)
        try:
            assert await rec.wait_for(lambda evs: len(evs) >= 3, 15), gw2.log_text()
            assert sorted(e.kind for e in rec.events) == sorted(
                ["call.started", "call.answered", "call.completed"]
            )
            assert all(e.signature_ok for e in rec.events)
            assert len(final_events(rec.events)) == 1
        finally:
            gw2.stop()
    finally:
        await runner.cleanup()
