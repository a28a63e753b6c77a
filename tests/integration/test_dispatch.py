"""Dispatch by load and by health, through a real node (Kamailio + pjsua2 workers): every slot
takes a call, the front refuses the call beyond them itself (503 + Retry-After, no worker asked),
calls ending and starting at full load need no failover, and a worker whose event loop lags is
offered no call until it recovers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.kamailio import RPC_NAME, lagging_workers, rpc_call
from tests.integration.conftest import final_events, sipp
from tests.integration.sipraw import invite, udp_peer
from tests.integration.test_node_pool import (
    CARRIER,
    active_calls,
    cmdline,
    pool_gateway,
    worker_pids,
)

pytestmark = pytest.mark.integration


def rpc_sock(gw: Any) -> Path:
    return Path(gw.storage) / "kamailio" / RPC_NAME


async def counters(gw: Any) -> dict[str, int]:
    result = await rpc_call(rpc_sock(gw), "cnt.grp_get_all", "script")
    return {k.split(".", 1)[-1]: int(v) for k, v in (result or {}).items()}


async def lagging(gw: Any) -> set[str]:
    return await lagging_workers(rpc_sock(gw))


async def until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


def hold(seconds: float) -> Any:
    return lambda req, form: {"actions": [{"pause": {"length": seconds}}, {"hangup": {}}]}


async def test_two_workers_hold_eight_and_the_front_refuses_the_ninth(
        voice_app, receiver, gateway_factory):
    _, events_url = receiver
    voice_app.script = hold(4)
    gw = pool_gateway(gateway_factory, voice_app, events_url, workers=2)  # reserved_slots 0
    run = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=8, limit=8, rate=50))
    await asyncio.sleep(1.5)
    live = await active_calls(gw)
    assert sorted(c["worker"] for c in live) == [0] * 4 + [1] * 4, live
    with udp_peer() as carrier:
        started = time.monotonic()
        call_id, data = invite(gw.sip_port, carrier.port)
        carrier.send(data, gw.sip_port)
        reply = await carrier.final(3, "INVITE", call_id)
        elapsed = time.monotonic() - started
    assert reply is not None and reply.startswith("SIP/2.0 503"), reply
    assert "Retry-After: 5" in reply and elapsed < 0.5, (elapsed, reply)
    # Refused before any relay (counter in route TO_WORKER): no worker saw the INVITE.
    c = await counters(gw)
    assert (c["workers_full"], c["failovers"]) == (1, 0), c
    _, ok, failed, out = await run
    assert (ok, failed) == (8, 0), out
    assert len(voice_app.requests) == 8


async def test_half_again_the_capacity_is_refused_at_the_invite(
        voice_app, receiver, gateway_factory):
    """Offered 1.5x what its slots hold, the node answers what it holds and the front refuses
    the rest with 503 + Retry-After before any worker sees them: no answered call fails."""
    rec, events_url = receiver
    voice_app.script = hold(2)
    gw = pool_gateway(gateway_factory, voice_app, events_url, workers=2)
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=24, limit=12, rate=50,
                                    timeout=30)
    assert ok >= 8 and ok + failed == 24, out
    c = await counters(gw)
    assert (c["workers_full"], c["failovers"]) == (failed, 0), (c, out)
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == ok, 10)
    assert {e.kind for e in final_events(rec.events)} == {"call.completed"}
    assert len(voice_app.requests) == ok


async def test_a_refusing_worker_says_why_and_when_to_retry(
        voice_app, receiver, gateway_factory):
    """A worker's own 503 (decided before any media, in pjsua's thread) carries Retry-After and
    the reason a front acts on; pjsua dropped both when the refusal was a hangup()."""
    _, events_url = receiver
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)  # one worker on sip.listen, no front
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{gw.api_port}/admin/drain",
                             headers={"Authorization": "Bearer test-token"}) as r:
            assert r.status == 202
    with udp_peer() as carrier:
        call_id, data = invite(gw.sip_port, carrier.port)
        carrier.send(data, gw.sip_port)
        reply = await carrier.final(3, "INVITE", call_id)
    assert reply is not None and reply.startswith("SIP/2.0 503"), reply
    assert "Retry-After: 5" in reply and "X-Sautikit-Refused: draining" in reply, reply
    assert voice_app.requests == []


async def test_calls_ending_and_starting_at_full_load_need_no_failover(
        voice_app, receiver, gateway_factory):
    """A new INVITE right behind a call's BYE: the front's count and the worker's agree, so
    no worker refuses one (no 503 chain) and no call is refused."""
    _, events_url = receiver
    voice_app.script = hold(1)
    gw = pool_gateway(gateway_factory, voice_app, events_url, workers=2)
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=32, limit=8, rate=40,
                                    timeout=30)
    assert (ok, failed) == (32, 0), out
    c = await counters(gw)
    assert (c["workers_full"], c["failovers"]) == (0, 0), c


async def test_a_worker_waiting_for_its_bye_answer_is_not_offered_its_slot(
        voice_app, receiver, gateway_factory):
    """The dialog leaves the front's count as the worker's BYE passes; the worker holds the
    slot until the carrier answers it. The front counts a BYE until its answer, so the INVITEs
    that keep coming at a full node are refused by the front, none by a worker."""
    rec, events_url = receiver
    voice_app.script = hold(1)
    gw = pool_gateway(gateway_factory, voice_app, events_url, workers=2)
    slow_bye = Path(__file__).parent / "sipp" / "node_carrier_slow_bye.xml"
    _, ok, failed, out = await sipp(slow_bye, gw.sip_port, calls=40, limit=9, rate=10,
                                    timeout=30)
    assert ok >= 8 and ok + failed == 40, out
    c = await counters(gw)
    assert (c["workers_full"], c["failovers"]) == (failed, 0), (c, out)
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == ok, 10)
    assert {e.kind for e in final_events(rec.events)} == {"call.completed"}


@contextlib.asynccontextmanager
async def starved(pid: int) -> Any:
    """The process gets 50 ms of every 550: a machine too busy for it. Its event loop lags;
    its pjsua2 thread still answers OPTIONS probes within the front's 2 s."""
    stop = asyncio.Event()

    async def cycle() -> None:
        try:
            while not stop.is_set():
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(0.5)
                os.kill(pid, signal.SIGCONT)
                await asyncio.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGCONT)

    task = asyncio.create_task(cycle())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_a_lagging_worker_gets_no_calls_until_it_recovers(
        voice_app, receiver, gateway_factory):
    _, events_url = receiver
    voice_app.script = hold(1)
    gw = pool_gateway(gateway_factory, voice_app, events_url, workers=2)
    pid = next(p for p in worker_pids(gw) if "--index 1 " in cmdline(p))
    async with starved(pid):
        assert await until(lambda: _lags(gw), 5), "the front never heard worker 1 lags"
        run = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=4, limit=4, rate=20))
        await asyncio.sleep(0.8)
        live = await active_calls(gw)
        _, ok, failed, out = await run
    assert (ok, failed) == (4, 0), out
    assert [c["worker"] for c in live] == [0] * 4, live
    assert (await counters(gw))["failovers"] == 0, "worker 1 was not even offered a call"
    # Recovered: the node tells the front, which offers it calls again.
    assert await until(lambda: _clear(gw), 5), "worker 1 still skipped after it recovered"
    run = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=4, limit=4, rate=20))
    await asyncio.sleep(0.8)
    live = await active_calls(gw)
    _, ok, failed, out = await run
    assert (ok, failed) == (4, 0), out
    assert {c["worker"] for c in live} == {0, 1}, live
    log = gw.log_text()
    assert "worker1" in log and "refusing new calls" in log and "accepting new calls" in log


async def _lags(gw: Any) -> bool:
    return bool(await lagging(gw))


async def _clear(gw: Any) -> bool:
    return not await lagging(gw)
