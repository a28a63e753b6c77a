"""/healthz and /readyz while a node starts: not accepting calls until its workers and SIP front
are up (a harness that trusted `accepting_calls` sent INVITEs into a node still starting)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.demo import free_port_block
from tests.integration.conftest import ROOT, write_config

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer test-token"}


async def test_not_ready_until_workers_and_front_are_up(tmp_path: Path, voice_app) -> None:
    base = free_port_block(2)
    config = write_config(
        tmp_path, voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=None,
        workers=f"count = 2\ncalls_per_worker = 4\nreserved_slots = 0\nsip_port_start = {base}",
        kamailio='mode = "managed"\nping_interval_s = 1')
    import tomllib

    api = "http://" + tomllib.loads(config.read_text())["api"]["listen"]
    log = tmp_path / "gateway.log"
    proc = subprocess.Popen(  # noqa: ASYNC220 - the test polls it, never waits on it here
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    seen: list[tuple[bool, bool, int, bool]] = []  # healthz accepting, ready, readyz, log says
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    async with http.get(f"{api}/healthz") as r:
                        health = await r.json()
                    async with http.get(f"{api}/readyz") as r:
                        readyz = r.status
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
                    continue
                node_ready = b"node ready:" in log.read_bytes()
                seen.append((health["accepting_calls"], health.get("ready", False), readyz,
                             node_ready))
                if readyz == 200 and health["accepting_calls"]:
                    break
                await asyncio.sleep(0.05)
            text = log.read_text(errors="replace")
            assert seen and seen[-1][:3] == (True, True, 200), (seen, text)
            assert any(not acc and rz == 503 for acc, _, rz, _ in seen), \
                f"the API answers before the workers are ready: {seen}"
            for accepting, ready, readyz, node_ready in seen:
                if accepting or ready or readyz == 200:
                    assert node_ready, f"ready before the node said so: {seen}\n{text}"
            # Draining: still healthy, not ready.
            async with http.post(f"{api}/admin/drain", headers=AUTH) as r:
                assert r.status == 202
            async with http.get(f"{api}/readyz") as r:
                assert (r.status, await r.json()) == (503, {"ready": False, "reason": "draining"})
            async with http.get(f"{api}/healthz") as r:
                assert (r.status, (await r.json())["accepting_calls"]) == (200, False)
            async with http.delete(f"{api}/admin/drain", headers=AUTH) as r:
                assert r.status == 200
            async with http.get(f"{api}/readyz") as r:
                assert r.status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_not_ready_while_the_front_is_down(voice_app, gateway_factory) -> None:
    base = free_port_block(2)
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=None,
        workers=f"count = 2\ncalls_per_worker = 4\nreserved_slots = 0\nsip_port_start = {base}",
        kamailio='mode = "managed"\nping_interval_s = 1')
    api = f"http://127.0.0.1:{gw.api_port}"
    kamailio = int((gw.storage / "kamailio" / "kamailio.pid").read_text())
    seen: list[tuple[int, dict]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async with http.get(f"{api}/readyz") as r:
            assert r.status == 200
        os.killpg(kamailio, signal.SIGKILL)  # the SIP front and its children
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            async with http.get(f"{api}/readyz") as r:
                seen.append((r.status, await r.json()))
            if seen[-1][0] == 200 and len(seen) > 1 and any(s == 503 for s, _ in seen):
                break
            await asyncio.sleep(0.02)
        async with http.get(f"{api}/healthz") as r:
            assert r.status == 200, "liveness is not readiness"
    assert (503, {"ready": False, "reason": "front_down"}) in seen, seen[:5]
    assert seen[-1][0] == 200, f"ready again once the front is back: {seen[-3:]}"
