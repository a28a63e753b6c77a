"""A node of several pjsua2 workers behind a real Kamailio: more calls than one process holds,
failover past full and dead workers, a worker killed mid-call, drain."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from gateway.demo import free_port_block
from tests.integration import conftest
from tests.integration.conftest import final_events, sipp

pytestmark = pytest.mark.integration
CARRIER = Path(__file__).parent / "sipp" / "node_carrier.xml"
AUTH = {"Authorization": "Bearer test-token"}


def pool_gateway(gateway_factory, voice_app, events_url, *, workers=3, reserved=0, front="",
                 start=None):
    base = free_port_block(workers)
    start_line = f'\nstart = "{start}"' if start is not None else ""
    return gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url,
        workers=f"count = {workers}\ncalls_per_worker = 4\nreserved_slots = {reserved}\n"
                f"sip_port_start = {base}{start_line}",
        kamailio='mode = "managed"\nping_interval_s = 1\n' + front)


async def active_calls(gw) -> list[dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.api_port}/v1/calls", headers=AUTH) as r:
            return (await r.json())["data"]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def worker_pids(gw) -> list[int]:
    return list(conftest.worker_pids(gw).values())


async def test_pool_holds_more_calls_than_one_worker(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 3}}, {"hangup": {}}]}
    gw = pool_gateway(gateway_factory, voice_app, events_url)
    run = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=10, limit=10, rate=50))
    await asyncio.sleep(2.0)
    live = await active_calls(gw)
    _, ok, failed, out = await run
    assert (ok, failed) == (10, 0), out
    assert len(live) == 10, live
    assert {c["worker"] for c in live} == {0, 1, 2}, "spread over the three workers"
    assert max(sum(1 for c in live if c["worker"] == w) for w in range(3)) <= 4
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 10, 10)
    assert {e.kind for e in final_events(rec.events)} == {"call.completed"}


async def test_full_node_refuses_with_503(phone, voice_app, receiver, gateway_factory):
    _, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 4}}, {"hangup": {}}]}
    gw = pool_gateway(gateway_factory, voice_app, events_url, reserved=1)  # 3 x 3 calls
    run = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=9, limit=9, rate=50))
    await asyncio.sleep(1.5)
    assert len(await active_calls(gw)) == 9
    # Every worker is full: Kamailio tried each (each answered 503) and refuses the call.
    extra = phone.make_call(gw.uri)
    end = await asyncio.wait_for(extra.wait_ended(), 15)
    assert end.sip_code == 503 and not end.was_answered
    _, ok, failed, out = await run
    assert (ok, failed) == (9, 0), out
    assert len(voice_app.requests) == 9, "the refused call never reached the voice app"


async def test_killed_worker_costs_only_its_calls(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 4}}, {"hangup": {}}]}
    gw = pool_gateway(gateway_factory, voice_app, events_url)
    run = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=6, limit=6, rate=50,
                                   timeout=20))
    await asyncio.sleep(1.5)
    live = await active_calls(gw)
    assert len(live) == 6
    victim = 1
    lost = {c["call_id"] for c in live if c["worker"] == victim}
    assert lost, live
    pids = worker_pids(gw)
    victim_pid = next(p for p in pids if f"--index {victim} " in cmdline(p))
    os.kill(victim_pid, signal.SIGKILL)
    assert await rec.wait_for(
        lambda evs: {e.body["data"]["call_id"] for e in final_events(evs)} >= lost, 10)
    for e in final_events(rec.events):
        if e.body["data"]["call_id"] in lost:
            assert e.kind == "call.failed" and e.body["data"]["reason"] == "worker_lost"
    _, ok, failed, out = await run
    # The front sends the dead worker's callers a BYE (they end as successful SIPp calls).
    assert (ok, failed) == (6, 0), out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 6, 10)
    others = [e for e in final_events(rec.events) if e.body["data"]["call_id"] not in lost]
    assert {e.kind for e in others} == {"call.completed"}
    # New calls still go through: past the dead worker, then to it once restarted.
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=6, limit=6, rate=50)
    assert (ok, failed) == (6, 0), out
    assert gw.log_text().count("worker 1 ready") == 2


async def test_drain_stops_new_calls_and_reports_zero(phone, voice_app, receiver,
                                                      gateway_factory):
    _, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 3}}, {"hangup": {}}]}
    gw = pool_gateway(gateway_factory, voice_app, events_url)
    api = f"http://127.0.0.1:{gw.api_port}"
    ongoing = phone.make_call(gw.uri)
    await asyncio.wait_for(ongoing.answer(), 10)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/admin/drain", headers=AUTH) as r:
            assert r.status == 202
            assert (await r.json())["active_calls"] == 1
        refused = phone.make_call(gw.uri)
        end = await asyncio.wait_for(refused.wait_ended(), 10)
        assert end.sip_code == 503
        async with http.post(f"{api}/admin/drain?wait=10", headers=AUTH) as r:
            body = await r.json()
        assert body == {"draining": True, "active_calls": 0, "drained": True}
        assert ongoing.ended and ongoing.end.by == "remote", "the ongoing call ran to its end"
        async with http.delete(f"{api}/admin/drain", headers=AUTH) as r:
            assert r.status == 200
    await asyncio.sleep(0.5)
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=3, limit=3, rate=50)
    assert (ok, failed) == (3, 0), out


async def test_two_nodes_behind_one_front(voice_app, receiver, gateway_factory):
    """Multi-node is the same dispatcher list with workers on other hosts: node B runs workers
    only (`kamailio.mode = "external"`), node A's Kamailio dispatches to both nodes' workers."""
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 3}}, {"hangup": {}}]}
    base_b = free_port_block(2)
    node_b = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url,
        workers=f"count = 2\ncalls_per_worker = 4\nreserved_slots = 0\nsip_port_start = {base_b}",
        kamailio='mode = "external"')
    base_a = free_port_block(2)
    node_a = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url,
        workers=f"count = 2\ncalls_per_worker = 4\nreserved_slots = 0\nsip_port_start = {base_a}",
        kamailio=f'mode = "managed"\nping_interval_s = 1\nremote_workers = '
                 f'["sip:127.0.0.1:{base_b}", "sip:127.0.0.1:{base_b + 1}"]')
    run = asyncio.create_task(sipp(CARRIER, node_a.sip_port, calls=14, limit=14, rate=50))
    await asyncio.sleep(2.0)
    on_a, on_b = len(await active_calls(node_a)), len(await active_calls(node_b))
    _, ok, failed, out = await run
    assert (ok, failed) == (14, 0), out
    assert on_a + on_b == 14 and on_a <= 8 and on_b >= 6, (on_a, on_b)
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 14, 10)
