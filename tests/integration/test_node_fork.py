"""Workers forked from the fork server (`[workers] start = "fork"`, the default) behind a real
Kamailio: they take calls, a killed one is forked again and its calls get their worker_lost
finals, a killed fork server is relaunched while the workers go on; `start = "spawn"` still
starts each worker as its own interpreter."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from tests.integration.conftest import final_events, sipp, worker_pids
from tests.integration.test_node_pool import CARRIER, active_calls, pool_gateway

pytestmark = pytest.mark.integration


def node(gateway_factory, voice_app, events_url, *, start: str = "fork", workers: int = 2):
    return pool_gateway(gateway_factory, voice_app, events_url, workers=workers, start=start)


def fork_servers(gw) -> list[int]:
    out = []
    for p in psutil.Process(gw.proc.pid).children():
        try:
            if "gateway.forkserver" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def parent_of(pid: int) -> int:
    return psutil.Process(pid).ppid()


async def until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


async def test_forked_workers_take_calls(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}
    gw = node(gateway_factory, voice_app, events_url)
    [zygote] = fork_servers(gw)
    pids = worker_pids(gw)
    assert sorted(pids) == [0, 1]
    assert {parent_of(p) for p in pids.values()} == {zygote}, "forked by the fork server"
    assert gw.log_text().count("forked)") == 2
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=4, limit=4, rate=50)
    assert (ok, failed) == (4, 0), out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 4, 10)
    assert {e.kind for e in final_events(rec.events)} == {"call.completed"}
    assert len(voice_app.requests) == 4, "each call fetched its document"


async def test_killed_forked_worker_is_forked_again(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 4}}, {"hangup": {}}]}
    gw = node(gateway_factory, voice_app, events_url)
    [zygote] = fork_servers(gw)
    run = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=4, limit=4, rate=50,
                                   timeout=20))
    await asyncio.sleep(1.5)
    live = await active_calls(gw)
    assert len(live) == 4, live
    victim = live[0]["worker"]
    lost = {c["call_id"] for c in live if c["worker"] == victim}
    old = worker_pids(gw)[victim]
    os.kill(old, signal.SIGKILL)
    assert await rec.wait_for(
        lambda evs: {e.body["data"]["call_id"] for e in final_events(evs)} >= lost, 10)
    for e in final_events(rec.events):
        if e.body["data"]["call_id"] in lost:
            assert e.kind == "call.failed" and e.body["data"]["reason"] == "worker_lost"
    new = await until(lambda: worker_pids(gw).get(victim) not in (None, old), 10,
                      "the worker restarted")
    assert new
    assert parent_of(worker_pids(gw)[victim]) == zygote, "forked again by the fork server"
    await until(lambda: gw.log_text().count(f"worker {victim} ready") == 2, 10, "ready again")
    _, ok, failed, out = await run
    assert (ok, failed) == (4, 0), out
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=4, limit=4, rate=50)
    assert (ok, failed) == (4, 0), out


async def test_killed_fork_server_is_relaunched(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 3}}, {"hangup": {}}]}
    gw = node(gateway_factory, voice_app, events_url)
    [zygote] = fork_servers(gw)
    before = worker_pids(gw)
    run = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=2, limit=2, rate=50))
    await asyncio.sleep(1.0)
    os.kill(zygote, signal.SIGKILL)
    # Workers it forked go on: their calls end normally.
    _, ok, failed, out = await run
    assert (ok, failed) == (2, 0), out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 2, 10)
    assert {e.kind for e in final_events(rec.events)} == {"call.completed"}
    assert all(psutil.pid_exists(p) for p in before.values())
    [relaunched] = await until(lambda: [p for p in fork_servers(gw) if p != zygote], 15,
                               "a new fork server")
    await until(lambda: "fork server ready" in gw.log_text().split("fork server exited")[-1],
                30, "the new fork server ready")
    # A worker killed now has its exit seen (pidfd) though its zygote is gone, and is forked
    # by the new one.
    os.kill(before[0], signal.SIGKILL)
    await until(lambda: worker_pids(gw).get(0) not in (None, before[0]), 15, "worker 0 back")
    assert parent_of(worker_pids(gw)[0]) == relaunched
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=2, limit=2, rate=50)
    assert (ok, failed) == (2, 0), out


async def test_spawn_mode_starts_interpreters(voice_app, receiver, gateway_factory):
    _, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}
    gw = node(gateway_factory, voice_app, events_url, start="spawn")
    assert fork_servers(gw) == []
    pids = worker_pids(gw)
    assert sorted(pids) == [0, 1]
    assert {parent_of(p) for p in pids.values()} == {gw.proc.pid}
    assert "spawned)" in gw.log_text() and "forked)" not in gw.log_text()
    _, ok, failed, out = await sipp(CARRIER, gw.sip_port, calls=2, limit=2, rate=50)
    assert (ok, failed) == (2, 0), out
