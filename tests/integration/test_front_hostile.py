"""The SIP front against careless and hostile peers, through a real node (Kamailio + pjsua2
workers): in-dialog requests without a Route header, forged in-dialog requests (open relay),
sources outside `sip.allowed_sources`, INVITEs that bypass the front, oversized INVITEs, a worker
killed under live calls (the carrier gets its BYE)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.demo import free_port, free_port_block
from tests.integration import conftest
from tests.integration.conftest import NUMBER, final_events, sipp
from tests.integration.sipraw import invite, tcp_request, udp_peer

pytestmark = pytest.mark.integration
SIPP_DIR = Path(__file__).parent / "sipp"


def node(
    gateway_factory: Any,
    voice_app: Any,
    events_url: str,
    *,
    workers: int = 2,
    extra: str = "",
    kamailio: str = "",
) -> Any:
    base = free_port_block(workers)
    return gateway_factory(
        voice_url=f"{voice_app.base_url}/voice",
        app_secret=voice_app.secret,
        events_url=events_url,
        workers=f"count = {workers}\ncalls_per_worker = 4\nreserved_slots = 0\n"
        f"sip_port_start = {base}",
        kamailio=f'mode = "managed"\nping_interval_s = 1\n{kamailio}',
        extra=extra,
    )


async def builtin_sipp(
    scenario: str, port: int, *, calls: int = 1, timeout: int = 15, extra: tuple[str, ...] = ()
) -> tuple[int, str]:
    """SIPp's built-in scenario (`-sn`), as a newcomer runs it."""
    proc = await asyncio.create_subprocess_exec(
        "sipp",
        "-sn",
        scenario,
        f"127.0.0.1:{port}",
        "-s",
        NUMBER,
        "-m",
        str(calls),
        "-i",
        "127.0.0.1",
        "-p",
        str(free_port(socket.SOCK_DGRAM)),
        "-timeout",
        str(timeout),
        "-timeout_error",
        "-nostdin",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout + 10)
    return proc.returncode or 0, out.decode(errors="replace")[-3000:]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def worker_pids(gw: Any) -> dict[int, int]:
    """worker index -> pid."""
    return conftest.worker_pids(gw)


def worker_ports(gw: Any) -> list[int]:
    """The SIP ports of the node's running workers, from the node's own plan."""
    from config.settings import load_settings
    from gateway.plan import plan_node

    plan = plan_node(load_settings(gw.config), max_calls=4)
    return [plan.workers[i].sip_port for i in sorted(worker_pids(gw))]


def pause_then_hangup(seconds: float) -> Any:
    return lambda req, form: {"actions": [{"pause": {"length": seconds}}, {"hangup": {}}]}


# --------------------------------------------------------------------------- 1. no Route


async def test_builtin_uac_without_route_headers_completes(voice_app, receiver, gateway_factory):
    """SIPp's built-in `uac` sends ACK and BYE to the front with no Route header (it ignores
    Record-Route): the front routes them by the dialog to the worker that answered."""
    rec, events_url = receiver
    voice_app.script = pause_then_hangup(10)
    gw = node(gateway_factory, voice_app, events_url)
    rc, out = await builtin_sipp("uac", gw.sip_port, calls=2, extra=("-d", "1000"))
    assert rc == 0, out
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 2, 10)
    finals = final_events(rec.events)
    assert {e.kind for e in finals} == {"call.completed"}, [e.body for e in finals]
    assert len(voice_app.requests) == 2


# --------------------------------------------------------------------------- 2. open relay


async def test_forged_in_dialog_requests_are_not_relayed(voice_app, receiver, gateway_factory):
    """A forged To-tag plus a Route naming the front (or a pre-loaded Route naming another host)
    must not make the front relay to a host it never dialled."""
    _, events_url = receiver
    voice_app.script = pause_then_hangup(1)
    gw = node(gateway_factory, voice_app, events_url)
    front = f"<sip:127.0.0.1:{gw.sip_port};lr>"
    with udp_peer() as victim, udp_peer() as attacker:
        target = f"sip:victim@127.0.0.1:{victim.port}"
        cases = [
            ("INVITE", target, f"Route: {front}\r\n"),
            ("MESSAGE", target, f"Route: {front}\r\n"),
            ("BYE", target, f"Route: {front}\r\n"),
            ("INVITE", "", f"Route: <{target};lr>\r\n"),
            ("BYE", "", f"Route: <{target};lr>\r\n"),
            ("MESSAGE", target, ""),
        ]
        for method, ruri, headers in cases:
            cid, data = invite(
                gw.sip_port,
                attacker.port,
                method=method,
                ruri=ruri,
                headers=headers,
                to_tag=secrets.token_hex(4),
            )
            attacker.send(data, gw.sip_port)
            reply = await attacker.final(3, call_id=cid)
            # 403/404: no such dialog; 405: a method no outsider may send in a dialog (MESSAGE)
            assert reply is not None and re.match(r"SIP/2\.0 40[345] ", reply), (method, reply)
        assert await victim.replies(1.0) == [], "the front relayed to a host it never dialled"
    assert voice_app.requests == []


# --------------------------------------------------------------------------- 3. allowed_sources


async def test_invite_from_outside_allowed_sources_gets_403(
    voice_app, receiver, gateway_factory, monkeypatch
):
    rec, events_url = receiver
    voice_app.script = pause_then_hangup(1)
    monkeypatch.setenv("SAUTIKIT_SIP__ALLOWED_SOURCES", '["127.0.0.2/32"]')
    gw = node(gateway_factory, voice_app, events_url)
    with udp_peer("127.0.0.1") as stranger:
        cid, data = invite(gw.sip_port, stranger.port)
        stranger.send(data, gw.sip_port)
        reply = await stranger.final(3, call_id=cid)
        assert reply is not None and reply.startswith("SIP/2.0 403"), reply
    assert voice_app.requests == []
    with udp_peer("127.0.0.2") as trunk:
        cid, data = invite(gw.sip_port, trunk.port, lhost="127.0.0.2")
        trunk.send(data, gw.sip_port)
        reply = await trunk.final(5, call_id=cid)
        assert reply is not None and reply.startswith("SIP/2.0 200"), reply
        trunk.ack_and_bye(reply, gw.sip_port)
    from gateway.kamailio import rpc_call

    got = await rpc_call(gw.storage / "kamailio" / "rpc.sock", "cnt.get", "script", "source_denied")
    assert int(got) == 1, got
    assert "not in sip.allowed_sources; 403" in gw.log_text()
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 1, 10)


# --------------------------------------------------------------------------- 6. bypass


async def test_invite_straight_to_a_worker_is_refused(voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = pause_then_hangup(1)
    gw = node(gateway_factory, voice_app, events_url)
    ports = worker_ports(gw)
    assert len(ports) == 2
    with udp_peer() as peer:
        for port in ports:
            cid, data = invite(port, peer.port)
            peer.send(data, port)
            reply = await peer.final(3, call_id=cid)
            assert reply is not None and reply.startswith("SIP/2.0 403"), reply
    assert voice_app.requests == []
    # through the front it works
    with udp_peer() as carrier:
        cid, data = invite(gw.sip_port, carrier.port)
        carrier.send(data, gw.sip_port)
        reply = await carrier.final(5, "INVITE", cid)
        assert reply is not None and reply.startswith("SIP/2.0 200"), reply
        carrier.ack_and_bye(reply, gw.sip_port)
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 1, 10)


# --------------------------------------------------------------------------- 7. worker lost


async def test_carrier_gets_bye_when_the_worker_dies(
    voice_app, receiver, gateway_factory, tmp_path
):
    rec, events_url = receiver
    voice_app.script = pause_then_hangup(30)
    gw = node(gateway_factory, voice_app, events_url)
    run = asyncio.create_task(
        sipp(SIPP_DIR / "node_carrier.xml", gw.sip_port, timeout=15, cwd=tmp_path)
    )
    import aiohttp

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 8
    live: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        while not live and loop.time() < deadline:
            await asyncio.sleep(0.3)
            async with http.get(
                f"http://127.0.0.1:{gw.api_port}/v1/calls",
                headers={"Authorization": "Bearer test-token"},
            ) as r:
                live = (await r.json())["data"]
    assert len(live) == 1, live
    await asyncio.sleep(0.5)  # answered and ACKed
    os.kill(worker_pids(gw)[live[0]["worker"]], signal.SIGKILL)
    killed = loop.time()
    rc, ok, failed, out = await run
    assert (rc, ok, failed) == (0, 1, 0), out  # the carrier got its BYE and answered 200
    assert loop.time() - killed < 5, f"BYE came {loop.time() - killed:.1f} s after the kill"
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 1, 10)
    final = final_events(rec.events)[0]
    assert final.kind == "call.failed" and final.body["data"]["reason"] == "worker_lost"
    assert final.body["data"]["sip_code"] == 200  # it was answered when the worker died
    # Commands to the lost call do not hang: it is ended (hangup answers as for any ended
    # call, redirect is refused), and its record says why.
    call_id = live[0]["call_id"]
    auth = {"Authorization": "Bearer test-token"}
    base = f"http://127.0.0.1:{gw.api_port}/v1/calls/{call_id}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/hangup", headers=auth) as r:
            assert (r.status, await r.json()) == (200, {"call_id": call_id, "status": "hung_up"})
        async with http.post(f"{base}/redirect", headers=auth,
                             json={"actions": [{"hangup": {}}]}) as r:
            assert r.status == 409, await r.text()
        async with http.get(base, headers=auth) as r:
            call = (await r.json())["call"]
    assert call["status"] == "failed" and call["failure_code"] == "worker_lost", call


# --------------------------------------------------------------------------- 5. large INVITEs


async def test_large_invites_run_or_get_513_and_long_via_chains_483(
    voice_app, receiver, gateway_factory
):
    rec, events_url = receiver
    voice_app.script = pause_then_hangup(0.5)
    gw = node(gateway_factory, voice_app, events_url)
    identity = "Identity: " + "e" * 8000 + ";info=<https://cert.example/c.pem>;alg=ES256\r\n"
    with udp_peer() as carrier:
        # 8 KB of STIR/SHAKEN Identity over UDP: the front removes it, the call runs
        cid, data = invite(gw.sip_port, carrier.port, headers=identity)
        assert len(data) > 8000
        carrier.send(data, gw.sip_port)
        reply = await carrier.final(5, "INVITE", cid)
        assert reply is not None and reply.startswith("SIP/2.0 200"), reply
        carrier.ack_and_bye(reply, gw.sip_port)
        # 60 KB of an unknown header: removed too (only what the workers use is kept)
        cid, data = invite(gw.sip_port, carrier.port, headers="X-Padding: " + "p" * 60000 + "\r\n")
        carrier.send(data, gw.sip_port)
        reply = await carrier.final(5, "INVITE", cid)
        assert reply is not None and reply.startswith("SIP/2.0 200"), reply
        carrier.ack_and_bye(reply, gw.sip_port)
        # what cannot be made to fit (an 11 KB SDP) gets 513
        sdp = (
            "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            + ("a=x-filler:" + "f" * 100 + "\r\n") * 100
            + "m=audio 9 RTP/AVP 8\r\n"
        )
        cid, data = invite(gw.sip_port, carrier.port, body=sdp)
        carrier.send(data, gw.sip_port)
        reply = await carrier.final(3, "INVITE", cid)
        assert reply is not None and reply.startswith("SIP/2.0 513"), reply
        # 1000 Via headers: 483
        cid, data = invite(gw.sip_port, carrier.port, vias=1000)
        carrier.send(data, gw.sip_port)
        reply = await carrier.final(3, "INVITE", cid)
        assert reply is not None and reply.startswith("SIP/2.0 483"), reply
    # the same 8 KB Identity INVITE over TCP
    reply = await tcp_request(
        gw.sip_port,
        lambda lport: invite(gw.sip_port, lport, transport="TCP", headers=identity)[1],
        hang_up=True,
    )
    assert reply is not None and reply.startswith("SIP/2.0 200"), reply
    assert await rec.wait_for(lambda evs: sum(e.kind == "call.started" for e in evs) == 3, 10), (
        rec.events
    )
    assert len(voice_app.requests) == 3  # each call's document was fetched
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 3, 10)


async def test_without_a_front_the_worker_applies_allowed_sources(
    voice_app, receiver, gateway_factory, monkeypatch
):
    """kamailio.mode = "off": the one worker binds sip.listen and refuses strangers itself."""
    rec, events_url = receiver
    voice_app.script = pause_then_hangup(1)
    monkeypatch.setenv("SAUTIKIT_SIP__ALLOWED_SOURCES", '["127.0.0.2"]')
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    with udp_peer("127.0.0.1") as stranger:
        cid, data = invite(gw.sip_port, stranger.port)
        stranger.send(data, gw.sip_port)
        reply = await stranger.final(3, "INVITE", cid)
        assert reply is not None and reply.startswith("SIP/2.0 403"), reply
    with udp_peer("127.0.0.2") as trunk:
        cid, data = invite(gw.sip_port, trunk.port, lhost="127.0.0.2")
        trunk.send(data, gw.sip_port)
        reply = await trunk.final(5, "INVITE", cid)
        assert reply is not None and reply.startswith("SIP/2.0 200"), reply
        trunk.ack_and_bye(reply, gw.sip_port)
    assert len(voice_app.requests) == 1
    assert await rec.wait_for(lambda evs: len(final_events(evs)) == 1, 10)


async def test_carrier_gets_bye_after_the_whole_node_is_killed(
    voice_app, receiver, gateway_factory, tmp_path
):
    """kill -9 of the supervisor and its workers: Kamailio (its parent gone) stops and keeps the
    dialogs on disk; the restarted node ends them, so the caller gets a BYE."""
    from tests.integration.conftest import start_gateway

    _, events_url = receiver
    voice_app.script = pause_then_hangup(60)
    gw = node(gateway_factory, voice_app, events_url)
    run = asyncio.create_task(
        sipp(SIPP_DIR / "node_carrier.xml", gw.sip_port, timeout=25, cwd=tmp_path)
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 8
    while len(voice_app.requests) < 1 and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # answered and ACKed
    for pid in [*worker_pids(gw).values(), gw.proc.pid]:  # supervisor and workers, at once
        os.kill(pid, signal.SIGKILL)
    gw.proc.wait(5)
    await asyncio.sleep(1.0)
    assert not run.done()
    again = start_gateway(gw.config, gw.config.parent)
    try:
        rc, ok, failed, out = await run
        assert (rc, ok, failed) == (0, 1, 0), out + again.log_text()[-3000:]
        assert "ended 1 dialog(s) of all" in again.log_text()
    finally:
        again.stop()
