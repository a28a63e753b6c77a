"""INVITE floods at a node: every INVITE gets a final answer, no worker dies, live calls finish.

The cause they guard against: pjsua opens a call's RTP/RTCP sockets before `onIncomingCall`, and a
closed socket's I/O-queue slot (64 per process) only comes back 500 ms later; refusing a burst
from asyncio churned slots until `pj_ioqueue_register_sock2` asserted and every worker aborted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.conftest import final_events, sipp
from tests.integration.test_node_pool import active_calls, pool_gateway, worker_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIPP = Path(__file__).parent / "sipp"
CARRIER = SIPP / "node_carrier.xml"
FLOOD = SIPP / "flood_uac.xml"
UNKNOWN = "+254799999999"
# The front's own defences (per-source limit, skipping full workers) would keep the flood off
# the workers; they are tested in test_kamailio_front.py. Here the workers take the flood.
NO_FRONT_LIMITS = "flood_limit = 0\nload_aware = false"


async def flood(port: int, *, rate: int, seconds: int, service: str = "+254700000001"):
    n = rate * seconds
    # -recv_timeout: an INVITE with no final answer in 8 s fails its call.
    return await sipp(FLOOD, port, calls=n, limit=n, rate=rate, timeout=30, service=service,
                      args=("-recv_timeout", "8000"))


async def wait_live(gw, n: int, within: float = 6.0) -> None:
    for _ in range(int(within / 0.25)):
        if len(await active_calls(gw)) >= n:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"not {n} live calls: {await active_calls(gw)}")


async def test_flood_at_a_full_node(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 10}}, {"hangup": {}}]}
    gw = pool_gateway(gateway_factory, voice_app, events_url, reserved=1,  # 3 x 3 slots
                      front=NO_FRONT_LIMITS)
    live = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=9, limit=9, rate=50,
                                    timeout=40))
    await wait_live(gw, 9)
    pids = sorted(worker_pids(gw))
    assert len(pids) == 3
    # 300 INVITEs/s for 3 s through the front: each is offered to every (full) worker.
    _, ok, failed, out = await flood(gw.sip_port, rate=300, seconds=3)
    assert (ok, failed) == (900, 0), out
    # ... and straight at one worker's SIP port (not the front: 403 before any socket opens).
    worker_port = int(gw.config.read_text().split("sip_port_start = ")[1].split()[0])
    _, ok, failed, out = await flood(worker_port, rate=300, seconds=2)
    assert (ok, failed) == (600, 0), out
    assert sorted(worker_pids(gw)) == pids, "a worker died"
    assert "exited" not in gw.log_text()
    _, ok, failed, out = await live
    assert (ok, failed) == (9, 0), out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 9, 10)
    assert {e.kind for e in final_events(rec.events)} == {"call.completed"}
    assert len(voice_app.requests) == 9, "no flood INVITE was answered"


async def test_burst_at_unknown_numbers(voice_app, receiver, gateway_factory):
    _, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}
    gw = pool_gateway(gateway_factory, voice_app, events_url, reserved=1, front=NO_FRONT_LIMITS)
    pids = sorted(worker_pids(gw))
    # What a SIP scanner sends: unknown numbers (404) and non-numbers (404), 300/s.
    _, ok, failed, out = await flood(gw.sip_port, rate=300, seconds=3, service=UNKNOWN)
    assert (ok, failed) == (900, 0), out
    _, ok, failed, out = await flood(gw.sip_port, rate=300, seconds=1, service="100")
    assert (ok, failed) == (300, 0), out
    assert sorted(worker_pids(gw)) == pids, "a worker died"
    await asyncio.sleep(1.0)  # the refusals' sockets come back to the queue
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=3, limit=3, rate=50)
    assert (ok, failed) == (3, 0), out
