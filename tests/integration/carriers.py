"""Carriers behind trunks, for outbound tests: SIPp UASes (tests/integration/sipp/trunk_*.xml)
on free loopback ports, their received messages logged so tests can read what reached them."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from config.settings import TrunkSettings
from gateway.demo import free_port
from gateway.kamailio import sip_ping

SIPP_DIR = Path(__file__).parent / "sipp"


@dataclass
class Carrier:
    """A SIPp UAS; exits after its calls (0 when every one followed the scenario)."""

    scenario: str
    port: int
    transport: str
    log: Path
    proc: asyncio.subprocess.Process

    def trunk(self, name: str, **kw: Any) -> TrunkSettings:
        """A `[[trunks]]` entry pointing at this carrier."""
        return TrunkSettings.model_validate(
            {"name": name, "address": f"127.0.0.1:{self.port}", "transport": self.transport, **kw}
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def result(self, timeout: float = 10.0) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return -1

    def received(self) -> list[tuple[float, str]]:
        """(time SIPp logged it, message) for every message it received."""
        if not self.log.exists():
            return []
        out = []
        text = self.log.read_text(errors="replace")
        for block in re.split(r"\n(?=-{20,} \d{4}-\d\d-\d\d )", "\n" + text):
            head = re.match(r"-{20,} (\S+ \S+)\n(\w+) message received", block.strip("\n"))
            if head:
                at = datetime.strptime(head.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
                body = block.strip("\n").split("\n", 2)[2] if block.count("\n") > 2 else ""
                out.append((at, body.strip()))
        return out

    def requests(self, method: str) -> list[tuple[float, str]]:
        return [(at, m) for at, m in self.received() if m.startswith(f"{method} ")]

    def why(self) -> str:
        text = self.text()
        errs = "".join(p.read_text(errors="replace")[-2000:]
                       for p in self.log.parent.glob("*_errors.log"))
        return f"{self.scenario}:\n{text[-3000:]}\n{errs}"


async def listening_tcp(port: int, timeout: float) -> bool:
    """True once something listens on 127.0.0.1:port over TCP (read from /proc, no connect:
    SIPp counts every connection)."""
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:  # noqa: ASYNC240
            cols = line.split()
            if cols[1] == want and cols[3] == "0A":
                return True
        await asyncio.sleep(0.05)
    return False


@dataclass
class Carriers:
    tmp: Path
    started: list[Carrier] = field(default_factory=list)

    async def start(self, scenario: str, *, calls: int = 1, transport: str = "udp",
                    args: tuple[str, ...] = (), timeout: int = 40) -> Carrier:
        port = free_port(socket.SOCK_DGRAM, both=True)
        d = self.tmp / f"carrier-{port}"
        d.mkdir()
        log = d / "messages.log"
        n = calls + (1 if transport == "udp" else 0)  # the readiness OPTIONS counts as a call
        proc = await asyncio.create_subprocess_exec(
            "sipp", "-sf", str(SIPP_DIR / scenario), "-i", "127.0.0.1", "-p", str(port),
            "-t", "u1" if transport == "udp" else "t1", "-m", str(n),
            "-mp", str(free_port(socket.SOCK_DGRAM) // 2 * 2),
            "-timeout", str(timeout), "-timeout_error", "-nostdin",
            "-trace_msg", "-message_file", str(log), "-trace_err", *args,
            cwd=d, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        c = Carrier(scenario, port, transport, log, proc)
        self.started.append(c)
        if transport == "udp":
            assert await sip_ping("127.0.0.1", port, 5.0) == 200, f"{scenario} not up"
        else:
            assert await listening_tcp(port, 5.0), f"{scenario} not listening on tcp"
        return c


    async def stop(self) -> None:
        for carrier in self.started:
            if carrier.proc.returncode is None:
                carrier.proc.kill()
                await carrier.proc.wait()


@pytest.fixture
async def carriers(tmp_path: Path) -> AsyncIterator[Carriers]:
    c = Carriers(tmp_path)
    yield c
    await c.stop()
