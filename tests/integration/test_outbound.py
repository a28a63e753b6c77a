"""Outbound calls end to end: POST /v1/calls on a real node (supervisor, workers, Kamailio
front) -> INVITE through the front and a `[[trunks]]` entry -> a carrier (SIPp UAS, or the
pjsua2 `phone` fixture when what the callee hears is measured) -> voice app -> signed events.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from media.audio import active_duration, read_wav
from media.tts.espeak import EspeakTts
from tests.integration.carriers import Carrier, carriers  # noqa: F401 (fixture)
from tests.integration.conftest import NUMBER, dump, final_events
from tests.integration.test_front_hostile import node
from tests.unit.test_metrics import parse

pytestmark = pytest.mark.integration

DEST = "+254722000001"
GREETING = "Hello from Sautikit. Your call is connected."
TOKEN = "test-token"


def trunk_toml(name: str, port: int, transport: str = "udp", **kw: Any) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in kw.items())
    return (f'[[trunks]]\nname = "{name}"\naddress = "127.0.0.1:{port}"\n'
            f'transport = "{transport}"\nmax_cps = 200\n{extra}')


def outbound_node(gateway_factory: Any, voice_app: Any, events_url: str, trunks: list[str], *,
                  workers: int = 2, extra: str = "") -> Any:
    """A node with a managed front (flood limit off: tests place calls quickly) and trunks."""
    return node(gateway_factory, voice_app, events_url, workers=workers,
                kamailio="flood_limit = 0", extra=extra + "\n" + "\n".join(trunks))


async def api(gw: Any, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(
        method, f"http://127.0.0.1:{gw.api_port}{path}", json=body,
        headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})}, allow_redirects=False,
    ) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


def of_call(events: list[Any], call_id: str) -> list[Any]:
    return [e for e in events if e.body["data"].get("call_id") == call_id]


# --------------------------------------------------------------------------- answered


async def test_answered_call_hears_the_voice_app_and_is_reported_outbound(
    phone, voice_app, receiver, gateway_factory, tmp_path
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {
        "actions": [{"say": {"text": GREETING, "voice": "alice", "language": "en-US"}},
                    {"hangup": {}}]
    }
    heard: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    invites: list[Any] = []
    tasks: list[asyncio.Task[None]] = []

    def on_incoming(call: Any, invite: Any) -> None:
        invites.append(invite)

        async def answer_and_listen() -> None:
            await call.answer()
            heard.set_result(await call.record(tmp_path / "heard.wav", max_length_s=20,
                                               silence_timeout_s=0, finish_on_key="", beep=None))
        tasks.append(asyncio.ensure_future(answer_and_listen()))

    phone.on_incoming = on_incoming
    try:
        gw = outbound_node(gateway_factory, voice_app, events_url,
                           [trunk_toml("carrier", phone.cfg.sip_port)])
        status, body = await api(gw, "POST", "/v1/calls/originate", {
            "to": DEST, "from": NUMBER, "voice_callback_url": f"{voice_app.base_url}/voice",
            "client_request_id": "crm-42",
        })
        assert status == 201, body
        assert body["status"] == "ringing" and body["direction"] == "outbound"
        assert body["to"] == DEST and body["from"] == NUMBER and body["created_at"]
        assert body["id"] == body["call_id"] and body["client_request_id"] == "crm-42"
        result = await asyncio.wait_for(heard, 30)
    finally:
        phone.on_incoming = None
    call_id = body["id"]

    # The callee heard the prompt, and the call came from our number through the front.
    expected = await EspeakTts(tmp_path / "tts").synthesize(GREETING, "alice", "en-US", 8000)
    x_ref, r_ref = read_wav(Path(expected))
    x, rate = read_wav(result.path)
    assert abs(active_duration(x, rate) - active_duration(x_ref, r_ref)) < 0.5
    assert NUMBER in invites[0].from_uri
    assert invites[0].source.endswith(f":{gw.sip_port}"), "the INVITE left through the front"

    # The voice app was asked on answer: outbound, in progress, with the correlation id.
    req = voice_app.requests[0]
    assert req["signature_ok"] and req["query"].get("clientRequestId") == "crm-42"
    form = req["form"]
    assert form["direction"] == "outbound" and form["callStatus"] == "in-progress"
    assert form["callId"] == call_id and form["clientRequestId"] == "crm-42"
    assert form["from"] == NUMBER and form["to"] == DEST

    assert await rec.wait_for(lambda evs: final_events(evs, call_id), 10), dump(rec.events)
    evs = of_call(rec.events, call_id)
    assert [e.kind for e in evs] == ["call.started", "call.answered", "call.completed"]
    for e in evs:
        assert e.signature_ok
        d = e.body["data"]
        assert d["direction"] == "outbound" and d["clientRequestId"] == "crm-42"
        assert d["from"] == NUMBER and d["to"] == DEST
    done = evs[-1].body["data"]
    assert done["status"] == "completed" and done["sip_code"] == 200
    assert done["hangup_cause"] == "normal_clearing" and done["duration_seconds"] >= 1

    # The record: GET /v1/calls/{id} after the end.
    status, got = await api(gw, "GET", f"/v1/calls/{call_id}")
    assert status == 200, got
    assert got["call"]["status"] == "completed" and got["call"]["direction"] == "outbound"
    assert [e["kind"] for e in got["call"]["events"]][-1] == "call.completed"


# --------------------------------------------------------------------------- not answered


@pytest.mark.parametrize(
    ("scenario", "status", "code", "callback"),
    [("trunk_486.xml", "busy", 486, "busy"), ("trunk_ring.xml", "no_answer", 487, "no-answer")],
)
async def test_unanswered_outcomes_reach_events_and_the_voice_app_once(
    voice_app, receiver, gateway_factory, carriers, scenario, status, code, callback  # noqa: F811
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    carrier: Carrier = await carriers.start(scenario)
    gw = outbound_node(gateway_factory, voice_app, events_url,
                       [trunk_toml("carrier", carrier.port)])
    status_code, body = await api(gw, "POST", "/v1/calls", {
        "to": [DEST], "from": NUMBER, "timeout": 2, "client_request_id": "x1",
    })
    assert status_code == 201, body
    call_id = body["call_id"]
    assert await rec.wait_for(lambda evs: final_events(evs, call_id), 15), dump(rec.events)
    evs = of_call(rec.events, call_id)
    assert [e.kind for e in evs] == ["call.started", "call.failed"], dump(evs)
    d = evs[-1].body["data"]
    assert (d["status"], d["sip_code"], d["direction"]) == (status, code, "outbound"), d
    assert d["clientRequestId"] == "x1" and d["reason"]
    await asyncio.sleep(0.5)
    assert [r["form"]["callStatus"] for r in voice_app.requests] == [callback]
    assert await carrier.result() == 0, carrier.why()
    if scenario == "trunk_ring.xml":
        assert carrier.requests("CANCEL"), "the gateway CANCELed after the ring timeout"


async def test_503_fails_over_to_the_second_trunk(
    voice_app, receiver, gateway_factory, carriers  # noqa: F811
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}
    dead = await carriers.start("trunk_503.xml")
    good = await carriers.start("trunk_answer.xml")
    gw = outbound_node(gateway_factory, voice_app, events_url,
                       [trunk_toml("first", dead.port), trunk_toml("second", good.port)])
    status, body = await api(gw, "POST", "/v1/calls", {"to": DEST, "from": NUMBER})
    assert status == 201, body
    call_id = body["call_id"]
    assert await rec.wait_for(lambda evs: final_events(evs, call_id), 15), dump(rec.events)
    evs = of_call(rec.events, call_id)
    assert [e.kind for e in evs] == ["call.started", "call.answered", "call.completed"]
    assert evs[-1].body["data"]["sip_code"] == 200
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.api_port}/metrics"
    ) as resp:
        metrics = await resp.text()
    fams = parse(metrics)
    attempts = fams["sautikit_trunk_attempts_total"]
    assert attempts.get(trunk="first", outcome="failover") == 1
    assert attempts.get(trunk="second", outcome="answered") == 1
    assert fams["sautikit_outbound_placements_total"].get(outcome="placed") == 1
    assert await dead.result() == 0, dead.why()
    assert await good.result() == 0, good.why()


async def test_hangup_of_a_ringing_call_cancels_it(
    voice_app, receiver, gateway_factory, carriers  # noqa: F811
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    carrier = await carriers.start("trunk_ring.xml")
    gw = outbound_node(gateway_factory, voice_app, events_url,
                       [trunk_toml("carrier", carrier.port)])
    status, body = await api(gw, "POST", "/v1/calls", {"to": DEST, "from": NUMBER})
    assert status == 201, body
    call_id = body["call_id"]
    await asyncio.sleep(1)
    status, got = await api(gw, "POST", f"/v1/calls/{call_id}/hangup")
    assert (status, got) == (200, {"call_id": call_id, "status": "hung_up"}), got
    assert await rec.wait_for(lambda evs: final_events(evs, call_id), 10), dump(rec.events)
    d = of_call(rec.events, call_id)[-1].body["data"]
    assert (d["status"], d["reason"]) == ("canceled", "api_hangup"), d
    assert carrier.requests("CANCEL")
    # idempotent: the ended call answers the same
    status, again = await api(gw, "POST", f"/v1/calls/{call_id}/hangup")
    assert (status, again) == (200, {"call_id": call_id, "status": "hung_up"})
    assert await carrier.result() == 0, carrier.why()


# --------------------------------------------------------------------------- idempotency


async def test_idempotency_replay_conflict_and_restart(
    voice_app, receiver, gateway_factory, carriers  # noqa: F811
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    carrier = await carriers.start("trunk_486.xml", calls=1)
    gw = outbound_node(gateway_factory, voice_app, events_url,
                       [trunk_toml("carrier", carrier.port)])
    req = {"to": DEST, "from": NUMBER}
    key = {"Idempotency-Key": "create-1"}
    first = await api(gw, "POST", "/v1/calls", req, key)
    assert first[0] == 201, first
    assert await api(gw, "POST", "/v1/calls", req, key) == first
    status, err = await api(gw, "POST", "/v1/calls", {**req, "to": "+254722000002"}, key)
    assert status == 409 and err["error"]["code"] == "idempotency.conflict", err
    call_id = first[1]["call_id"]
    assert await rec.wait_for(lambda evs: final_events(evs, call_id), 10)
    # After a restart on the same storage the key still answers, and nothing dials.
    gw.stop()
    from tests.integration.conftest import start_gateway

    gw2 = start_gateway(gw.config, gw.config.parent)
    try:
        assert await api(gw2, "POST", "/v1/calls", req, key) == first
    finally:
        gw2.stop()
    assert await carrier.result() == 0, carrier.why()
    assert len(carrier.requests("INVITE")) == 1, "one INVITE for three creates"


# --------------------------------------------------------------------------- capacity


@pytest.mark.slow
async def test_twelve_concurrent_calls_on_three_workers_fill_every_slot_once(
    voice_app, receiver, gateway_factory, carriers  # noqa: F811
):
    rec, events_url = receiver
    async def script(req: Any, form: dict[str, str]) -> Any:
        return {"actions": [{"pause": {"length": 4}}, {"hangup": {}}]}

    voice_app.script = script
    carrier = await carriers.start("trunk_answer.xml", calls=12)
    gw = outbound_node(gateway_factory, voice_app, events_url,
                       [trunk_toml("carrier", carrier.port)], workers=3,
                       extra="[outbound]\nqueue_s = 0.5")
    results = await asyncio.gather(*(
        api(gw, "POST", "/v1/calls", {"to": DEST, "from": NUMBER}) for _ in range(12)
    ))
    assert [s for s, _ in results] == [201] * 12, results
    await asyncio.sleep(1.5)
    status, listing = await api(gw, "GET", "/v1/calls?limit=100&direction=outbound")
    assert status == 200
    live = [c for c in listing["data"] if c["status"] in ("ringing", "in-progress")]
    per_worker: dict[int, int] = {}
    for c in live:
        per_worker[c["worker"]] = per_worker.get(c["worker"], 0) + 1
    assert len(live) == 12 and sorted(per_worker.values()) == [4, 4, 4], per_worker
    # A 13th finds no slot within the queue time: 503 with Retry-After.
    status, err = await api(gw, "POST", "/v1/calls", {"to": DEST, "from": NUMBER})
    assert status == 503 and err["error"]["retry_after_seconds"] >= 1, err
    ids = [b["call_id"] for _, b in results]
    assert await rec.wait_for(
        lambda evs: all(final_events(evs, i) for i in ids), 20
    ), dump(rec.events)
    assert await carrier.result(20) == 0, carrier.why()


# --------------------------------------------------------------------------- MCP control


async def test_mcp_controller_steers_the_call_by_reply_and_by_respond(
    voice_app, receiver, gateway_factory, carriers  # noqa: F811
):
    from aiohttp import web

    from tests.seed_receiver import verify_signature

    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    secret = "cp-secret-1"
    states: list[dict[str, Any]] = []
    second = asyncio.Event()

    async def control(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        verify_signature(raw, request.headers.get("X-Sautikit-Signature", ""), secret)
        state = json.loads(raw)
        states.append(state)
        if len(states) == 1:
            return web.json_response({"actions": [{"pause": {"length": 0.5}}]})
        second.set()
        return web.Response(status=204)  # actions will come through /respond

    app = web.Application()
    app.router.add_post("/control", control)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        carrier = await carriers.start("trunk_answer.xml")
        gw = outbound_node(
            gateway_factory, voice_app, events_url, [trunk_toml("carrier", carrier.port)],
            extra=f'[control_plane]\ncontrol_url = "http://127.0.0.1:{port}/control"\n'
            f'secret = "{secret}"\n',
        )
        status, body = await api(gw, "POST", "/v1/calls", {
            "to": DEST, "from": NUMBER, "control": "mcp", "control_timeout_ms": 8000,
            "client_request_id": "agent-7",
        })
        assert status == 201, body
        call_id = body["call_id"]
        await asyncio.wait_for(second.wait(), 15)
        status, got = await api(gw, "POST", f"/v1/calls/{call_id}/respond",
                                {"actions": [{"hangup": {}}]})
        assert status == 200, got
        assert await rec.wait_for(lambda evs: final_events(evs, call_id), 10), dump(rec.events)
    finally:
        await runner.cleanup()
    assert [s["cycle"] for s in states] == [1, 2], states
    assert [s["reason"] for s in states] == ["answered", "document_end"], states
    for s in states:
        assert s["callId"] == call_id and s["direction"] == "outbound"
        assert s["clientRequestId"] == "agent-7"
    d = final_events(rec.events, call_id)[0].body["data"]
    assert d["status"] == "completed", d
    assert voice_app.requests == [], "a controlled call asks its controller, not a voice app"
    assert await carrier.result() == 0, carrier.why()


async def test_a_full_trunk_queues_then_refuses_with_retry_after(
    voice_app, receiver, gateway_factory, carriers  # noqa: F811
):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    carrier = await carriers.start("trunk_ring.xml")
    gw = outbound_node(gateway_factory, voice_app, events_url,
                       [trunk_toml("carrier", carrier.port, max_calls=1)],
                       extra="[outbound]\nqueue_s = 0.5")
    status, first = await api(gw, "POST", "/v1/calls", {"to": DEST, "from": NUMBER})
    assert status == 201, first
    status, err = await api(gw, "POST", "/v1/calls", {"to": DEST, "from": NUMBER})
    assert status == 503 and err["error"]["code"] == "calls.capacity", err
    assert err["error"]["retry_after_seconds"] >= 1
    status, _ = await api(gw, "POST", f"/v1/calls/{first['call_id']}/hangup")
    assert status == 200
    assert await rec.wait_for(lambda evs: final_events(evs, first["call_id"]), 10)
    assert await carrier.result() == 0, carrier.why()
    assert len(carrier.requests("INVITE")) == 1, "the refused create sent nothing"
