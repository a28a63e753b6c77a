"""Outbound calls through trunks, for real: the `phone` fixture (a pjsua2 SipEndpoint in this
process) plays the gateway placing calls with `make_call(..., trunk=, from_uri=)`; SIPp UASes
(tests/integration/sipp/trunk_*.xml) play the carriers behind the trunks; a real Kamailio front
rendered by gateway/kamailio.py (the phone's port as its dispatcher destination, so its
FROM_WORKER route relays the phone's INVITEs) sits between them where a node has it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config.settings import TrunkSettings
from gateway.demo import free_port
from gateway.kamailio import KamailioConfig, KamailioFront, find_binary
from gateway.outbound.trunks import TrunkPool, should_fail_over
from media.call import NoCallSlot, SipCall
from tests.integration.carriers import Carrier, Carriers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_binary() is None, reason="kamailio is not installed"),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed"),
]

SIPP_DIR = Path(__file__).parent / "sipp"
CALLER = "+254700000001"  # our number: the caller id in From
DEST = "+254722000001"
USER, PASSWORD = "acct-1234", "s3cret-Pw"


@dataclass
class Env:
    carriers: Carriers
    fronts: list[KamailioFront]
    runtime: Path

    async def carrier(
        self, scenario: str, *, calls: int = 1, transport: str = "udp", args: tuple[str, ...] = ()
    ) -> Carrier:
        return await self.carriers.start(
            scenario, calls=calls, transport=transport, args=args, timeout=20
        )

    async def front(self, phone: Any, **kw: Any) -> KamailioFront:
        cfg = KamailioConfig(
            listen_host="127.0.0.1",
            listen_port=free_port(both=True),
            destinations=[f"sip:127.0.0.1:{phone.cfg.sip_port}"],
            runtime_dir=self.runtime / f"k{len(self.fronts)}",
            children=2,
            ping_interval_s=1,
            **kw,
        )
        f = KamailioFront(cfg)
        self.fronts.append(f)
        await f.start()
        return f


@pytest.fixture
async def env(tmp_path: Path, phone: Any) -> AsyncIterator[Env]:
    runtime = Path(tempfile.mkdtemp(prefix="kamt-", dir="/tmp"))  # short UNIX socket paths
    e = Env(Carriers(tmp_path), [], runtime)
    try:
        yield e
    finally:
        # Nothing of ours left on the shared phone for the next test.
        for call in list(phone.calls.values()):
            await call.hangup()
        phone.set_outbound_proxy("")
        for f in e.fronts:
            await f.stop()
        await e.carriers.stop()
        shutil.rmtree(runtime, ignore_errors=True)


async def via_front(env: Env, phone: Any, **kw: Any) -> KamailioFront:
    front = await env.front(phone, **kw)
    phone.set_outbound_proxy(f"sip:127.0.0.1:{front.cfg.listen_port};lr")
    return front


def place(phone: Any, trunk: TrunkSettings) -> SipCall:
    phone.add_trunk(
        trunk.name,
        username=trunk.username,
        password=trunk.password.get_secret_value() if trunk.password else None,
    )
    call: SipCall = phone.make_call(
        trunk.request_uri(DEST), trunk=trunk.name, from_uri=phone.caller_uri(CALLER)
    )
    return call


def assert_front_clean(front: KamailioFront | None) -> None:
    """Kamailio parsed everything it relayed (a reply it cannot parse is dropped, and the call's
    pjsua slot then stays taken until the INVITE transaction times out)."""
    if front is not None:
        errors = [ln for ln in front.log_tail().splitlines() if "ERROR" in ln]
        assert not errors, "\n".join(errors)


def why(carrier: Carrier, front: KamailioFront | None = None) -> str:
    parts = [f"{carrier.scenario}:\n{carrier.text()[-3000:]}"]
    parts += [p.read_text()[-2000:] for p in carrier.log.parent.glob("*_errors.log")]
    if front is not None:
        parts.append(f"kamailio:\n{front.log_tail()}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- answered


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_answered_through_the_front_caller_id_and_bye_follow_the_route(
    env: Env, phone: Any, transport: str
) -> None:
    front = await via_front(env, phone)
    carrier = await env.carrier("trunk_answer.xml", transport=transport)
    trunk = carrier.trunk(f"plain-{transport}", strip="+", prefix="00")
    sent = time.time()
    call = place(phone, trunk)
    assert call.sip_call_id and call.invite_sent_at is not None
    await asyncio.wait_for(call.answer(), 10)
    assert call.provisional_code == 180
    assert call.provisional_at is not None and call.answered_at is not None
    assert sent <= call.provisional_at <= call.answered_at
    await asyncio.sleep(0.2)
    await call.hangup()
    assert call.end is not None and call.end.by == "local" and call.end.was_answered
    assert await carrier.result() == 0, why(carrier, front)

    (at, invite), = carrier.requests("INVITE")
    # the trunk's rewriting, our caller id, and the front in the path
    assert invite.startswith(f"INVITE sip:00{DEST[1:]}@127.0.0.1:{carrier.port}"), invite
    assert re.search(rf"^From: <?sip:\{CALLER}@127\.0\.0\.1>?;tag=", invite, re.M), invite
    assert re.search(rf"^Call-ID: {re.escape(call.sip_call_id)}", invite, re.M)
    port = front.cfg.listen_port
    assert re.search(rf"^Via: SIP/2.0/{transport.upper()} 127.0.0.1:{port};", invite, re.M)
    assert re.search(rf"^Record-Route: <sip:127.0.0.1:{port};", invite, re.M), invite
    assert not re.search(r"^Route:", invite, re.M), "the front removed our Route to it"
    (_, bye), = carrier.requests("BYE")
    assert re.search(rf"^Via: SIP/2.0/{transport.upper()} 127.0.0.1:{port};", bye, re.M), bye
    assert len(carrier.requests("ACK")) == 1
    assert_front_clean(front)
    # How long from make_call to the carrier reading the INVITE (through the front).
    print(f"\nINVITE make_call -> carrier ({transport}, via front): {(at - sent) * 1000:.1f} ms")


async def test_the_callees_bye_reaches_us_through_the_front_with_its_cause(
    env: Env, phone: Any
) -> None:
    front = await via_front(env, phone)
    carrier = await env.carrier("trunk_answer_bye.xml")
    call = place(phone, carrier.trunk("callee-hangs-up"))
    await asyncio.wait_for(call.answer(), 10)
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert (end.by, end.was_answered, end.q850_cause) == ("remote", True, 16), end
    assert call.answered_at is not None and 0.4 < end.ended_at - call.answered_at < 3.0
    assert await carrier.result() == 0, why(carrier, front)
    assert_front_clean(front)


# --------------------------------------------------------------------------- digest auth


async def test_digest_challenge_answered_with_the_trunks_credentials(
    env: Env, phone: Any
) -> None:
    carrier = await env.carrier(
        "trunk_auth.xml", calls=2, args=("-set", "user", USER, "-set", "pass", PASSWORD)
    )
    good = carrier.trunk("auth-good", username=USER, password=PASSWORD)
    call = place(phone, good)  # direct: no proxy
    await asyncio.wait_for(call.answer(), 10)
    await call.hangup()
    assert call.end is not None and call.end.was_answered

    bad = carrier.trunk("auth-bad", username=USER, password="not-the-password")
    call = place(phone, bad)
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert (end.sip_code, end.was_answered, end.by) == (403, False, "remote"), end
    assert await carrier.result() == 0, why(carrier)

    invites = [m for _, m in carrier.requests("INVITE")]
    assert len(invites) == 4  # each call: challenged, then again with credentials
    authorized = [m for m in invites if re.search(r"^Authorization: Digest ", m, re.M)]
    assert len(authorized) == 2
    assert all(f'username="{USER}"' in m and 'realm="trunk.test"' in m for m in authorized)
    assert PASSWORD not in carrier.text()


# --------------------------------------------------------------------------- never answered


@pytest.mark.parametrize("path", ["front", "direct"])
async def test_ringing_call_cancelled_after_a_second_ends_487(
    env: Env, phone: Any, path: str
) -> None:
    front = await via_front(env, phone) if path == "front" else None
    carrier = await env.carrier("trunk_ring.xml")
    t0 = time.monotonic()
    call = place(phone, carrier.trunk(f"ring-{path}"))
    assert await asyncio.wait_for(_rang(call), 5) == 180
    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    end = await call.cancel()
    assert end is not None, "no final answer to our CANCEL"
    assert (end.sip_code, end.by, end.was_answered) == (487, "local", False), end
    assert call.provisional_code == 180 and not should_fail_over(end.sip_code, rang=True)
    assert await carrier.result() == 0, why(carrier, front)
    assert len(carrier.requests("CANCEL")) == 1 and len(carrier.requests("ACK")) == 1
    assert_front_clean(front)


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(("scenario", "code", "cause"), [("trunk_486.xml", 486, 17),
                                                         ("trunk_503.xml", 503, 34)])
async def test_final_refusal_reaches_us_with_its_code_and_q850_cause(
    env: Env, phone: Any, scenario: str, code: int, cause: int
) -> None:
    front = await via_front(env, phone)
    carrier = await env.carrier(scenario)
    call = place(phone, carrier.trunk(f"refuse-{code}"))
    end = await asyncio.wait_for(call.wait_ended(), 10)
    assert (end.sip_code, end.was_answered, end.by) == (code, False, "remote"), end
    assert end.q850_cause == cause
    assert call.provisional_code is None
    assert should_fail_over(end.sip_code, rang=False) is (code == 503)
    assert await carrier.result() == 0, why(carrier, front)
    assert_front_clean(front)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_dead_trunk_is_a_final_failure_without_ringing(
    env: Env, phone: Any, transport: str
) -> None:
    # Nothing listens at the trunk's address: over UDP the front gives up after its outbound
    # timer (408; kamailio out_fr_timer_ms, 1 s here), over TCP at once (connection refused:
    # 477). Either way no provisional answer came: the runner fails over.
    front = await via_front(env, phone, out_fr_timer_ms=1000)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # a UDP port that swallows everything
    try:
        port = sock.getsockname()[1] if transport == "udp" else free_port()
        dead = TrunkSettings(name=f"dead-{transport}", address=f"127.0.0.1:{port}",
                             transport=transport)
        t0 = time.monotonic()
        call = place(phone, dead)
        end = await asyncio.wait_for(call.wait_ended(), 10)
        took = time.monotonic() - t0
    finally:
        sock.close()
    assert not end.was_answered and call.provisional_code is None, end
    assert should_fail_over(end.sip_code, rang=False), end
    if transport == "udp":
        assert end.sip_code == 408 and 0.9 < took < 3.0, (end, took)
        assert_front_clean(front)
    else:  # "477 Unfortunately error on sending to next hop occurred"
        assert end.sip_code == 477 and took < 1.0, (end, took)


async def test_503_fails_over_to_the_next_trunk_which_answers(env: Env, phone: Any) -> None:
    # What the outbound runner does with the pool's targets: next trunk on a trunk failure.
    await via_front(env, phone)
    down = await env.carrier("trunk_503.xml")
    up = await env.carrier("trunk_answer.xml")
    pool = TrunkPool([down.trunk("fo-down"), up.trunk("fo-up")])
    pick = pool.pick(DEST, time.monotonic())
    assert [t.trunk for t in pick.targets] == ["fo-down", "fo-up"]
    tried = []
    for i, target in enumerate(pick.targets):
        if i:
            assert pool.acquire(target.trunk, time.monotonic()) == 0.0
            pool.started(target.trunk)
        phone.add_trunk(target.trunk)
        call = phone.make_call(target.uri, trunk=target.trunk, from_uri=phone.caller_uri(CALLER))
        try:
            await asyncio.wait_for(call.answer(), 10)
        except Exception:
            end = await asyncio.wait_for(call.wait_ended(), 5)
            tried.append((target.trunk, end.sip_code))
            if should_fail_over(end.sip_code, rang=call.provisional_code is not None):
                pool.ended(target.trunk, "failover")
                continue
            raise
        tried.append((target.trunk, 200))
        await call.hangup()
        pool.ended(target.trunk, "answered")
        break
    assert tried == [("fo-down", 503), ("fo-up", 200)]
    assert pool.attempts("fo-down") == {"failover": 1}
    assert pool.attempts("fo-up") == {"answered": 1}
    assert await down.result() == 0 and await up.result() == 0


# --------------------------------------------------------------------------- call slots


async def test_outbound_calls_keep_a_slot_for_refusing_invites(env: Env, phone: Any) -> None:
    # Three ringing outbound calls on a 4-slot endpoint: a fourth is refused before any INVITE
    # (NoCallSlot), and an INVITE arriving now is refused 503 by the gate, not 486 by pjsua for
    # want of a slot (which it would be with the fourth outbound call up).
    carrier = await env.carrier("trunk_ring.xml", calls=3)
    trunk = carrier.trunk("slots")
    calls = [place(phone, trunk) for _ in range(3)]
    for c in calls:
        await asyncio.wait_for(_rang(c), 5)
    with pytest.raises(NoCallSlot):
        place(phone, trunk)
    refused = phone.admission.refused
    reply = await _invite(phone.cfg.sip_port)
    assert reply.startswith("SIP/2.0 503 "), reply
    assert phone.admission.refused == refused + 1, "refused by the gate, before media"
    ends = await asyncio.gather(*(c.cancel() for c in calls))
    assert [e.sip_code if e else None for e in ends] == [487, 487, 487]
    assert await carrier.result() == 0, why(carrier)
    assert phone.admission.media_calls == 0 and phone.admission.outbound == 0


async def _rang(call: SipCall) -> int:
    if call.provisional_code is not None:
        return call.provisional_code
    rang: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    call.on_early.append(lambda code: rang.done() or rang.set_result(code))
    return await rang


async def _invite(port: int) -> str:
    """One INVITE (with an SDP offer) from a raw UDP socket; the first final response."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    lport = sock.getsockname()[1]
    sock.connect(("127.0.0.1", port))
    sdp = ("v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           "m=audio 40000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n")
    msg = (
        f"INVITE sip:{CALLER}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{time.time_ns()};rport\r\n"
        f"From: <sip:{DEST}@127.0.0.1:{lport}>;tag=t{lport}\r\n"
        f"To: <sip:{CALLER}@127.0.0.1:{port}>\r\n"
        f"Call-ID: slots-{time.time_ns()}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:{DEST}@127.0.0.1:{lport}>\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
    )
    try:
        await loop.sock_sendall(sock, msg.encode())
        deadline = loop.time() + 5
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65535), deadline - loop.time())
            text = data.decode(errors="replace")
            if not re.match(r"SIP/2.0 1\d\d ", text):
                return text
    finally:
        sock.close()


# Last in this file: it leaves a pjsua slot held for ~33 s on the shared phone.
async def test_cancel_before_any_ringing_holds_the_slot_as_pjsua_does(
    env: Env, phone: Any
) -> None:
    # The carrier is silent; only the front's 100 Trying came. Our CANCEL gets its 200 and the
    # call is DISCONNECTED at once, but PJSIP keeps the INVITE transaction (and its call slot)
    # until a final answer or Timer B: the gate counts that slot as taken meanwhile, so it
    # never admits an INVITE that pjsua would answer 486 itself.
    front = await via_front(env, phone)
    before = phone.admission.media_calls
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        silent = TrunkSettings(name="silent", address=f"127.0.0.1:{sock.getsockname()[1]}")
        call = place(phone, silent)
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        end = await call.cancel(timeout=3)
        took = time.monotonic() - t0
    finally:
        sock.close()
    assert end is not None and (end.sip_code, end.by) == (487, "local") and took < 1.0, end
    assert call.provisional_code is None
    assert phone.admission.media_calls == before + 1, "held until Timer B"
    assert phone.admission.free_slots() == phone.cfg.max_calls - 2 - before
    assert_front_clean(front)
