"""The README's "Place a call": the node on its embedded default (no config file; only ports and
storage moved, by environment, so tests can run side by side), SIPp's built-in `uas` as the
carrier behind the default's trunk, and the quickstart's originate request."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.demo import free_port, free_port_block
from tests.integration.conftest import ROOT, rtp_block

pytestmark = pytest.mark.integration


async def test_quickstart_originate_rings_sipp_and_reports_the_call(tmp_path: Path) -> None:
    sip, api = free_port(both=True), free_port()
    carrier_port = free_port(socket.SOCK_DGRAM, both=True)
    env = {
        **os.environ,
        "SAUTIKIT_SIP__LISTEN": f"127.0.0.1:{sip}",
        "SAUTIKIT_API__LISTEN": f"127.0.0.1:{api}",
        "SAUTIKIT_STORAGE__DIR": str(tmp_path / "var"),
        "SAUTIKIT_MEDIA__RTP_PORT_START": str(rtp_block()),
        "SAUTIKIT_WORKERS__SIP_PORT_START": str(free_port_block(11)),
        "SAUTIKIT_TRUNKS__0__ADDRESS": f"127.0.0.1:{carrier_port}",
    }
    log = (tmp_path / "gw.log").open("wb")
    gw = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", cwd=ROOT, env=env, stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    carrier = await asyncio.create_subprocess_exec(
        "sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(carrier_port), "-m", "1",
        "-timeout", "60", "-timeout_error", "-nostdin", "-trace_msg", cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while b"sautikit-gateway ready" not in (tmp_path / "gw.log").read_bytes():
            assert gw.returncode is None and time.monotonic() < deadline, \
                (tmp_path / "gw.log").read_text()[-3000:]
            await asyncio.sleep(0.1)
        base = f"http://127.0.0.1:{api}"
        auth = {"Authorization": "Bearer dev-token"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/calls/originate", headers=auth, json={
                "to": "+254722000001", "from": "+254700000001",
                "voice_callback_url": f"{base}/demo/voice",
            }) as resp:
                body = await resp.json()
                assert resp.status == 201, body
            assert body["status"] == "ringing" and body["direction"] == "outbound"
            # SIPp answers; the demo greets and hangs up; the record shows the whole life.
            assert await asyncio.wait_for(carrier.wait(), 40) == 0
            call: dict = {}
            for _ in range(50):
                async with http.get(f"{base}/v1/calls/{body['id']}", headers=auth) as resp:
                    call = (await resp.json())["call"]
                if call["status"] == "completed":
                    break
                await asyncio.sleep(0.1)
        assert call["status"] == "completed", call
        kinds = [e["kind"] for e in call["events"]]
        assert kinds == ["call.started", "call.answered", "call.completed"], kinds
        assert all(e["payload"]["direction"] == "outbound" for e in call["events"])
    finally:
        if carrier.returncode is None:
            carrier.kill()
            await carrier.wait()
        if gw.returncode is None:
            gw.terminate()
            try:
                await asyncio.wait_for(gw.wait(), 20)
            except TimeoutError:
                gw.kill()
                await gw.wait()
