"""A node that dies during calls: every call still gets exactly one final event that says so.

kill -9 of the whole node (supervisor, workers, Kamailio): the next start on the same storage
closes the calls it left open (`call.failed node_lost`) before taking calls. SIGKILL of the
supervisor alone: its workers end their calls as `call.failed supervisor_lost`, and the
restarted node delivers those events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.demo import free_port_block
from gateway.events.outbox import Outbox
from tests.integration import conftest
from tests.integration.conftest import (
    CALLER,
    NUMBER,
    Gateway,
    dump,
    final_events,
    sipp,
    start_gateway,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CARRIER = Path(__file__).parent / "sipp" / "node_carrier.xml"
AUTH = {"Authorization": "Bearer test-token"}
CALLS = 4


def start_node(config: Path, tmp: Path, timeout: float = 60) -> Gateway:
    return start_gateway(config, tmp, timeout, new_session=True)


def node_config(tmp: Path, voice_app: Any, events_url: str) -> Path:
    base = free_port_block(2)
    return write_config(
        tmp, voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url,
        workers=f"count = 2\ncalls_per_worker = 4\nreserved_slots = 0\nsip_port_start = {base}",
        kamailio='mode = "managed"\nping_interval_s = 1')


async def live_calls(gw: Gateway) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.api_port}/v1/calls", headers=AUTH) as r:
            return list((await r.json())["data"])


async def until_answered(gw: Gateway, n: int, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    calls: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        calls = await live_calls(gw)
        if len(calls) == n and all(c["answered_at"] for c in calls):
            return calls
        await asyncio.sleep(0.2)
    raise AssertionError(f"{n} answered calls expected, got {calls}")


def worker_pids(gw: Gateway) -> list[int]:
    return list(conftest.worker_pids(gw).values())


def kamailio_pid(gw: Gateway) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((gw.storage / "kamailio" / "kamailio.pid").read_text())
    return None


def kill_quietly(pids: list[int | None]) -> None:
    for pid in pids:
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def pause_then_hangup(req: Any, form: Any) -> dict[str, Any]:
    return {"actions": [{"pause": {"length": 30}}, {"hangup": {}}]}


async def test_killed_node_closes_its_calls_on_restart(tmp_path, voice_app, receiver):
    rec, events_url = receiver
    voice_app.script = pause_then_hangup
    config = node_config(tmp_path, voice_app, events_url)
    gw = start_node(config, tmp_path)
    restarted: Gateway | None = None
    others = [kamailio_pid(gw)]
    try:
        carrier = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=CALLS, limit=CALLS,
                                           rate=50, timeout=8))
        calls = await until_answered(gw, CALLS)
        ids = {c["call_id"] for c in calls}
        assert await rec.wait_for(
            lambda evs: sum(e.kind == "call.answered" for e in evs) == CALLS, 10), dump(rec.events)
        await asyncio.sleep(2.5)  # the calls last past at least one heartbeat
        others += worker_pids(gw)
        killed_at = time.time()
        os.killpg(gw.proc.pid, signal.SIGKILL)  # supervisor and workers at once
        kill_quietly([kamailio_pid(gw)])
        gw.proc.wait(5)
        await carrier  # SIPp gives up on the calls nobody ends
        await asyncio.sleep(1.0)
        assert final_events(rec.events) == [], "nobody was left to end the calls"

        restarted = start_node(config, tmp_path)
        assert await rec.wait_for(lambda evs: len(final_events(evs)) >= CALLS, 15), \
            dump(rec.events)
        await asyncio.sleep(1.5)  # a duplicate would arrive by now
        finals = final_events(rec.events)
        assert sorted(e.body["data"]["call_id"] for e in finals) == sorted(ids), dump(finals)
        for e in finals:
            d = e.body["data"]
            started = next(x.body["data"] for x in rec.events
                           if x.kind == "call.started" and x.body["data"]["call_id"]
                           == d["call_id"])
            answered = next(x.body["data"] for x in rec.events
                            if x.kind == "call.answered" and x.body["data"]["call_id"]
                            == d["call_id"])
            assert e.kind == "call.failed" and e.signature_ok
            assert (d["status"], d["reason"]) == ("failed", "node_lost"), d
            assert e.body["workspace_id"] == "ws_1"
            assert (d["from"], d["to"], d["number_id"], d["direction"]) == \
                (started["from"], started["to"], started["number_id"], "inbound")
            assert d["answered_at"] == answered["answered_at"]
            # No later than the crash, and at most a heartbeat interval (2 s) before it.
            ended = ts(d["ended_at"])
            assert ts(d["answered_at"]) <= ended <= killed_at + 0.01, (d, killed_at)
            assert ended >= killed_at - 3.0, (d, killed_at)
        assert started["from"] == CALLER and started["to"] == NUMBER
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{restarted.api_port}/metrics"
            async with http.get(url) as r:
                text = await r.text()
        assert f"sautikit_calls_recovered_total {CALLS}" in text, text
    finally:
        if restarted is not None:
            restarted.stop()
        gw.stop(signal.SIGKILL)
        kill_quietly(others)


async def test_supervisor_crash_fails_calls_as_supervisor_lost(tmp_path, voice_app, receiver):
    rec, events_url = receiver
    voice_app.script = pause_then_hangup
    config = node_config(tmp_path, voice_app, events_url)
    gw = start_node(config, tmp_path)
    restarted: Gateway | None = None
    workers: list[int] = []
    try:
        carrier = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=CALLS, limit=CALLS,
                                           rate=50, timeout=8))
        calls = await until_answered(gw, CALLS)
        ids = {c["call_id"] for c in calls}
        workers = worker_pids(gw)
        os.kill(gw.proc.pid, signal.SIGKILL)  # the supervisor only
        gw.proc.wait(5)
        await carrier
        restarted = start_node(config, tmp_path)  # waits for the old workers to finish
        assert await rec.wait_for(lambda evs: len(final_events(evs)) >= CALLS, 15), \
            dump(rec.events)
        await asyncio.sleep(1.0)
        finals = final_events(rec.events)
        assert sorted(e.body["data"]["call_id"] for e in finals) == sorted(ids), dump(finals)
        for e in finals:
            d = e.body["data"]
            assert e.kind == "call.failed" and e.signature_ok, dump(finals)
            assert (d["status"], d["reason"]) == ("failed", "supervisor_lost"), d
            assert d["answered_at"] and ts(d["ended_at"]) >= ts(d["answered_at"])
        assert "node_lost" not in restarted.log_text()
    finally:
        if restarted is not None:
            restarted.stop()
        gw.stop(signal.SIGKILL)
        kill_quietly(list(workers))


async def test_operator_stop_reports_node_shutdown(tmp_path, voice_app, receiver):
    """SIGTERM with calls live: the gateway cut them, so they are call.failed node_shutdown
    (answered_at and ended_at kept for billing), never a clean call.completed."""
    _, events_url = receiver
    voice_app.script = pause_then_hangup
    gw = start_node(node_config(tmp_path, voice_app, events_url), tmp_path)
    try:
        carrier = asyncio.create_task(sipp(CARRIER, gw.sip_port, calls=2, limit=2, rate=50,
                                           timeout=8))
        ids = {c["call_id"] for c in await until_answered(gw, 2)}
        gw.stop(signal.SIGTERM)
        assert gw.proc.returncode == 0, gw.log_text()
        await carrier
        with Outbox(gw.storage / "outbox.sqlite3") as outbox:
            finals = [r for i in ids for r in outbox.rows_for_call(i) if r.final]
        assert len(finals) == 2, gw.log_text()
        for row in finals:
            body = json.loads(row.body)
            d = body["data"]
            assert body["kind"] == "call.failed"
            assert (d["status"], d["reason"]) == ("failed", "node_shutdown"), d
            assert d["answered_at"] and ts(d["ended_at"]) >= ts(d["answered_at"])
    finally:
        gw.stop(signal.SIGKILL)
