"""The Kamailio front for real: Kamailio + SIPp stand-in workers + a SIPp carrier on loopback.

Stand-in workers are SIPp UAS processes (tests/integration/sipp/kam_uas*.xml) that answer
OPTIONS probes; the carrier is a SIPp UAC that follows the route set (kam_uac*.xml).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.demo import free_port
from gateway.kamailio import KamailioConfig, KamailioFront, find_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_binary() is None, reason="kamailio is not installed"),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed"),
]

SIPP_DIR = Path(__file__).parent / "sipp"
NUMBER = "+254700000001"


def udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@dataclass
class Uas:
    """A stand-in worker: one SIPp UAS process whose messages are logged to a file."""

    scenario: str
    port: int
    log: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    def received(self) -> dict[str, set[str]]:
        """Method -> Call-IDs of the requests this UAS received (retransmissions collapse)."""
        got: dict[str, set[str]] = defaultdict(set)
        if not self.log.exists():
            return got
        for block in re.split(r"\n-{20,}[^\n]*\n", self.log.read_text(errors="replace")):
            if "message received" not in block:
                continue
            m = re.search(r"^([A-Z]+) sip:", block, re.M)
            c = re.search(r"^Call-ID:\s*(\S+)", block, re.M | re.I)
            if m and c:
                got[m.group(1)].add(c.group(1))
        return got

    def count(self, method: str) -> int:
        return len(self.received()[method])


@dataclass
class Env:
    tmp: Path
    runtime: Path
    fronts: list[KamailioFront] = field(default_factory=list)
    uases: list[Uas] = field(default_factory=list)

    async def uas(self, scenario: str) -> Uas:
        port = udp_port()
        u = Uas(scenario, port, self.tmp / f"uas-{port}.log")
        u.proc = await asyncio.create_subprocess_exec(
            "sipp", "-sf", str(SIPP_DIR / scenario), "-i", "127.0.0.1", "-p", str(port),
            "-nostdin", "-trace_msg", "-message_file", str(u.log),
            cwd=self.tmp,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self.uases.append(u)
        # Up when it answers an OPTIONS (the scenario's probe branch).
        from gateway.kamailio import sip_ping

        assert await sip_ping("127.0.0.1", port, 5.0) == 200, f"{scenario} did not come up"
        return u

    async def front(self, destinations: list[str], **kw: object) -> KamailioFront:
        cfg = KamailioConfig(
            listen_host="127.0.0.1",
            listen_port=free_port(both=True),
            destinations=destinations,
            runtime_dir=self.runtime / f"k{len(self.fronts)}",
            children=2,
            ping_interval_s=1,
            **kw,  # type: ignore[arg-type]
        )
        f = KamailioFront(cfg)
        self.fronts.append(f)
        await f.start()
        return f


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    # UNIX socket paths are short: keep the runtime directory out of pytest's long tmp names.
    runtime = Path(tempfile.mkdtemp(prefix="kam-", dir="/tmp"))
    e = Env(tmp_path, runtime)
    try:
        yield e
    finally:
        for f in e.fronts:
            await f.stop()
        for u in e.uases:
            if u.proc is not None and u.proc.returncode is None:
                u.proc.terminate()
                try:
                    await asyncio.wait_for(u.proc.wait(), 3)
                except TimeoutError:
                    u.proc.kill()
                    await u.proc.wait()
        shutil.rmtree(runtime, ignore_errors=True)


@dataclass
class UacResult:
    rc: int
    out: str
    elapsed: float

    @property
    def successful(self) -> int:
        m = re.findall(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", self.out)
        return int(m[-1]) if m else -1

    @property
    def failed(self) -> int:
        m = re.findall(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", self.out)
        return int(m[-1]) if m else -1


async def uac(
    env: Env,
    front: KamailioFront,
    scenario: str = "kam_uac.xml",
    calls: int = 1,
    limit: int = 1,
    extra: tuple[str, ...] = (),
    port: int | None = None,
    timeout: int = 15,
    local_ip: str = "127.0.0.1",
) -> UacResult:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "sipp", "-sf", str(SIPP_DIR / scenario), f"127.0.0.1:{front.cfg.listen_port}",
        "-s", NUMBER, "-i", local_ip, "-p", str(port or udp_port()),
        "-m", str(calls), "-l", str(limit), "-r", "50",
        "-timeout", str(timeout), "-timeout_error", "-nostdin", *extra,
        cwd=env.tmp,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout + 10)
    assert proc.returncode is not None
    return UacResult(proc.returncode, out.decode(errors="replace"), time.monotonic() - started)


def why(front: KamailioFront, *uases: Uas, res: UacResult | None = None) -> str:
    parts = [f"kamailio:\n{front.log_tail()}"]
    parts += [f"{u.scenario}@{u.port}: {dict(u.received())}" for u in uases]
    if res is not None:
        parts.append(res.out[-2500:])
    return "\n".join(parts)


async def wait_state(front: KamailioFront, uri: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {d["uri"]: d["state"] for d in await front.destinations()}
        if states.get(uri) == state:
            return
        assert time.monotonic() < deadline, f"{uri} not {state} after {timeout}s: {states}"
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- calls


async def test_calls_spread_over_two_workers_and_in_dialog_requests_reach_them(env: Env) -> None:
    a, b = await env.uas("kam_uas.xml"), await env.uas("kam_uas.xml")
    front = await env.front([a.uri, b.uri])
    res = await uac(env, front, calls=8, limit=4)
    assert res.rc == 0 and res.successful == 8, why(front, a, b, res=res)
    for u in (a, b):
        got = u.received()
        # round robin: each worker took its share, and got the ACK and BYE of its own calls
        assert len(got["INVITE"]) == 4, why(front, a, b)
        assert got["ACK"] == got["INVITE"] and got["BYE"] == got["INVITE"], why(front, a, b)
    assert not (a.received()["INVITE"] & b.received()["INVITE"])


async def test_full_worker_503_and_unmarked_486_are_skipped(env: Env) -> None:
    full = await env.uas("kam_uas_503.xml")
    limit = await env.uas("kam_uas_486.xml")
    ok = await env.uas("kam_uas.xml")
    front = await env.front([full.uri, limit.uri, ok.uri])
    res = await uac(env, front, calls=6, limit=1)
    assert res.rc == 0 and res.successful == 6, why(front, full, limit, ok, res=res)
    assert ok.count("INVITE") == 6 and ok.count("BYE") == 6
    # round robin started calls on the refusing workers too, and they were failed over
    assert full.count("INVITE") >= 2 and limit.count("INVITE") >= 2, why(front, full, limit, ok)
    # nothing marked them dead: refusing a call is not being down
    states = {d["uri"]: d["state"] for d in await front.destinations()}
    assert states == {full.uri: "active", limit.uri: "active", ok.uri: "active"}


async def test_busy_from_the_voice_app_is_relayed_not_failed_over(env: Env) -> None:
    busy = await env.uas("kam_uas_busy.xml")  # 486 + X-Sautikit-Final
    ok = await env.uas("kam_uas.xml")
    front = await env.front([busy.uri, ok.uri])
    # two calls, round robin: the one on `busy` must come back 486 (the scenario expects it),
    # the other is answered 200 (so that scenario counts it failed)
    res = await uac(env, front, scenario="kam_uac_486.xml", calls=2, limit=1)
    assert res.successful == 1 and res.failed == 1, why(front, busy, ok, res=res)
    assert busy.count("INVITE") == 1 and ok.count("INVITE") == 1, why(front, busy, ok)


async def test_dead_worker_fails_over_on_timeout_then_probing_keeps_it_out(env: Env) -> None:
    ok = await env.uas("kam_uas.xml")
    dead = f"sip:127.0.0.1:{udp_port()}"  # nothing listens there
    front = await env.front([dead, ok.uri])
    # Before any probe has failed: one of the two calls is sent to the dead worker first and
    # gets through on the next one after fr_timer (2 s).
    res = await uac(env, front, calls=2, limit=1)
    assert res.rc == 0 and res.successful == 2, why(front, ok, res=res)
    assert ok.count("INVITE") == 2
    assert res.elapsed >= 1.8, res.elapsed
    # the silent worker was taken out at once (inactive, probed)
    await wait_state(front, dead, "inactive", 1.0)

    # Start over (reload resets probe states) and let probing alone find it.
    await front.reload()
    await wait_state(front, dead, "active", 1.0)
    await wait_state(front, dead, "inactive", 6.0)
    res = await uac(env, front, calls=4, limit=2)
    assert res.rc == 0 and res.successful == 4, why(front, ok, res=res)
    assert res.elapsed < 1.5, f"a call waited for the dead worker: {res.elapsed:.1f}s"
    assert ok.count("INVITE") == 6


async def test_no_worker_left_gives_503_with_retry_after(env: Env) -> None:
    full = await env.uas("kam_uas_503.xml")
    dead = f"sip:127.0.0.1:{udp_port()}"
    front = await env.front([full.uri, dead])
    # every destination refuses or is silent: failure_route runs out of destinations
    res = await uac(env, front, scenario="kam_uac_503.xml", calls=2, limit=1)
    assert res.rc == 0 and res.successful == 2, why(front, full, res=res)
    assert full.count("INVITE") == 2
    # nothing selectable at all (both disabled): request_route answers the same
    await front.set_state(full.uri, False)
    await front.set_state(dead, False)
    res = await uac(env, front, scenario="kam_uac_503.xml", calls=1)
    assert res.rc == 0 and res.successful == 1, why(front, full, res=res)
    assert res.elapsed < 1.5
    assert full.count("INVITE") == 2


async def test_set_state_takes_a_worker_out_and_back(env: Env) -> None:
    a, b = await env.uas("kam_uas.xml"), await env.uas("kam_uas.xml")
    front = await env.front([a.uri, b.uri])
    await front.set_state(a.uri, False)
    dests = {d["uri"]: d for d in await front.destinations()}
    assert dests[a.uri]["state"] == "disabled" and dests[b.uri]["state"] == "active"
    assert f"1 {a.uri} 12 0" in front.cfg.list_path.read_text()  # survives restart/reload

    res = await uac(env, front, calls=4, limit=2)
    assert res.rc == 0, why(front, a, b, res=res)
    assert a.count("INVITE") == 0 and b.count("INVITE") == 4
    # probes do not bring a disabled worker back, and neither does a reload
    await asyncio.sleep(1.5)
    await front.reload()
    assert {d["uri"]: d["state"] for d in await front.destinations()}[a.uri] == "disabled"

    await front.set_state(a.uri, True)
    await wait_state(front, a.uri, "active", 1.0)
    res = await uac(env, front, calls=4, limit=2)
    assert res.rc == 0, why(front, a, b, res=res)
    assert a.count("INVITE") == 2 and b.count("INVITE") == 6


async def test_cancel_reaches_the_ringing_worker(env: Env) -> None:
    a, b = await env.uas("kam_uas_ring.xml"), await env.uas("kam_uas_ring.xml")
    front = await env.front([a.uri, b.uri])
    res = await uac(env, front, scenario="kam_uac_cancel.xml", calls=2, limit=2)
    assert res.rc == 0 and res.successful == 2, why(front, a, b, res=res)
    for u in (a, b):
        got = u.received()
        assert len(got["INVITE"]) == 1 and got["CANCEL"] == got["INVITE"], why(front, a, b)


async def test_worker_calls_out_through_the_front(env: Env) -> None:
    carrier = await env.uas("kam_uas.xml")
    worker_port = udp_port()
    front = await env.front([f"sip:127.0.0.1:{worker_port}"])
    res = await uac(
        env,
        front,
        scenario="kam_worker_uac.xml",
        port=worker_port,
        extra=("-set", "carrier", f"127.0.0.1:{carrier.port}"),
    )
    assert res.rc == 0 and res.successful == 1, why(front, carrier, res=res)
    got = carrier.received()
    assert len(got["INVITE"]) == 1 and got["ACK"] == got["INVITE"] == got["BYE"]
    text = carrier.log.read_text()
    # the carrier saw the front in the path, and the front's address as the next hop
    assert re.search(rf"^Record-Route: <sip:127.0.0.1:{front.cfg.listen_port};lr[;>]", text, re.M)
    assert re.search(rf"^Via: SIP/2.0/UDP 127.0.0.1:{front.cfg.listen_port};", text, re.M)

    # a stranger (not in the dispatcher list) cannot use the front as a relay: its INVITE is
    # treated as an inbound call and dispatched to the workers (here the "worker" is gone).
    res = await uac(
        env,
        front,
        scenario="kam_worker_uac.xml",
        extra=("-set", "carrier", f"127.0.0.1:{carrier.port}"),
        timeout=8,
    )
    assert res.rc != 0
    assert carrier.count("INVITE") == 1


# --------------------------------------------------------------------------- SIP hygiene


async def sip_request(port: int, first_line: str, headers: str = "") -> str:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    lport = sock.getsockname()[1]
    sock.connect(("127.0.0.1", port))
    tag = secrets.token_hex(4)
    method = first_line.split()[0]
    msg = (
        f"{first_line}\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{secrets.token_hex(6)};rport\r\n"
        f"From: <sip:carrier@127.0.0.1:{lport}>;tag={tag}\r\n"
        f"Call-ID: {secrets.token_hex(8)}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"{headers}"
        "Content-Length: 0\r\n\r\n"
    )
    if "\r\nTo:" not in msg:
        msg = msg.replace("\r\nCall-ID", f"\r\nTo: <sip:{NUMBER}@127.0.0.1:{port}>\r\nCall-ID", 1)
    if "Max-Forwards" not in msg:
        msg = msg.replace("\r\nContent-Length", "\r\nMax-Forwards: 70\r\nContent-Length", 1)
    try:
        await loop.sock_sendall(sock, msg.encode())
        data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 3)
        return data.decode(errors="replace")
    finally:
        sock.close()


async def test_options_405_404_and_max_forwards(env: Env) -> None:
    ok = await env.uas("kam_uas.xml")
    front = await env.front([ok.uri])
    port = front.cfg.listen_port
    reply = await sip_request(port, f"OPTIONS sip:127.0.0.1:{port} SIP/2.0")
    assert reply.startswith("SIP/2.0 200"), reply
    reply = await sip_request(port, f"MESSAGE sip:{NUMBER}@127.0.0.1:{port} SIP/2.0")
    assert reply.startswith("SIP/2.0 405") and "Allow:" in reply, reply
    reply = await sip_request(
        port,
        f"BYE sip:{NUMBER}@127.0.0.1:{port} SIP/2.0",
        f"To: <sip:{NUMBER}@127.0.0.1:{port}>;tag=abc\r\n",
    )
    assert reply.startswith("SIP/2.0 404"), reply
    reply = await sip_request(
        port, f"INVITE sip:{NUMBER}@127.0.0.1:{port} SIP/2.0", "Max-Forwards: 0\r\n"
    )
    assert reply.startswith("SIP/2.0 483"), reply
    assert ok.count("INVITE") == 0 and ok.count("MESSAGE") == 0


# --------------------------------------------------------------------------- process


async def test_supervise_restarts_a_dead_kamailio_and_keeps_disabled_workers(env: Env) -> None:
    a, b = await env.uas("kam_uas.xml"), await env.uas("kam_uas.xml")
    front = await env.front([a.uri, b.uri])
    await front.set_state(a.uri, False)
    task = asyncio.create_task(front.supervise())
    try:
        first = front.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # the Kamailio this test started
        deadline = time.monotonic() + 10
        while not (front.running and front.pid != first):
            assert time.monotonic() < deadline, front.log_tail()
            await asyncio.sleep(0.1)
        assert front.restarts == 1
        assert await front.ping()
        states = {d["uri"]: d["state"] for d in await front.destinations()}
        assert states == {a.uri: "disabled", b.uri: "active"}
        res = await uac(env, front, calls=2, limit=2)
        assert res.rc == 0 and b.count("INVITE") == 2, why(front, a, b, res=res)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not front.running and front.returncode is not None


async def test_reload_with_a_new_list(env: Env) -> None:
    a, b = await env.uas("kam_uas.xml"), await env.uas("kam_uas.xml")
    front = await env.front([a.uri])
    await front.reload([a.uri, b.uri])
    assert {d["uri"] for d in await front.destinations()} == {a.uri, b.uri}
    assert b.uri in front.cfg.list_path.read_text()
    res = await uac(env, front, calls=4, limit=2)
    assert res.rc == 0, why(front, a, b, res=res)
    assert a.count("INVITE") == 2 and b.count("INVITE") == 2
    await front.reload([b.uri])  # a second reload within reload_delta is retried
    assert [d["uri"] for d in await front.destinations()] == [b.uri]


# --------------------------------------------------------------------------- limits


async def test_flood_from_one_source_is_dropped_at_the_front(env: Env) -> None:
    """A scanner's burst from one address is dropped before it reaches a worker (pike, counted);
    a carrier on another address still gets its call through meanwhile."""
    from tests.integration.sipraw import invite, udp_peer

    ok = await env.uas("kam_uas.xml")
    front = await env.front([ok.uri], flood_limit=10, flood_window_s=2)
    port = front.cfg.listen_port
    burst = 150
    with udp_peer() as scanner:
        for _ in range(burst):
            scanner.send(invite(port, scanner.port, ruri=f"sip:100@127.0.0.1:{port}")[1], port)
        res = await uac(env, front, local_ip="127.0.0.2")
        answered = await scanner.replies(1.0)
    assert res.rc == 0 and res.successful == 1, why(front, ok, res=res)
    reached = ok.count("INVITE") - 1
    dropped = (await front.counters())["flood_dropped"]
    # pike blocks between 1x and 3x the limit per window
    assert reached <= 3 * 10 * 2, reached
    assert dropped >= burst - reached - 5 and dropped > 0, (dropped, reached)
    assert sum(a.startswith("SIP/2.0 100") for a in answered) <= reached


async def test_full_workers_are_not_offered_calls(env: Env) -> None:
    """With max_load, a worker holding that many calls through the front is skipped: when all
    are full the carrier gets 503 at once and no worker sees the INVITE (no 503 chain)."""
    from tests.integration.sipraw import invite, udp_peer

    workers = [await env.uas("kam_uas.xml") for _ in range(3)]
    front = await env.front([u.uri for u in workers], max_load=1)
    port = front.cfg.listen_port
    with udp_peer() as carrier:
        for _ in range(3):  # answered, never ACKed: each holds its worker's one slot
            carrier.send(invite(port, carrier.port)[1], port)
        await carrier.replies(0.5)
        assert [u.count("INVITE") for u in workers] == [1, 1, 1], why(front, *workers)
        started = time.monotonic()
        call_id, data = invite(port, carrier.port)
        carrier.send(data, port)
        reply = await carrier.final(2, "INVITE", call_id)
        elapsed = time.monotonic() - started
    assert reply is not None and reply.startswith("SIP/2.0 503"), reply
    assert "Retry-After:" in reply and elapsed < 0.5, elapsed
    assert [u.count("INVITE") for u in workers] == [1, 1, 1], why(front, *workers)
    assert (await front.counters())["workers_full"] == 1
