"""`sautikit-gateway demo`: start a gateway on free loopback ports, call it, report what happened.

The caller is a second pjsua2 endpoint in this process; it records what it hears. Events go to
a receiver here that checks every signature the way the product's docs tell customers to.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.events.signing import verify


def free_port(kind: int = socket.SOCK_STREAM, both: bool = False) -> int:
    """A port free on 127.0.0.1 (for `both`, free for TCP and UDP alike)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not both:
            return port
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s2:
                s2.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def free_port_block(n: int, lo: int = 53500, hi: int = 56000) -> int:
    """The first of n consecutive ports in [lo, hi) free for UDP and TCP on 127.0.0.1.

    The default range (for worker SIP ports) lies between the test gateways' RTP blocks
    (32000-53500, tests/integration/conftest.rtp_block) and rtpengine's (56000-60000,
    tests/integration/webrtc.rtp_range): a worker port inside a node's RTP range is refused
    by the config check."""
    import random

    for _ in range(200):
        base = random.randrange(lo, hi - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    sk = socket.socket(socket.AF_INET, kind)
                    socks.append(sk)
                    sk.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
        return base
    raise RuntimeError("no free port block")


@dataclass
class ReceivedEvent:
    at: float
    kind: str
    body: dict[str, Any]
    headers: dict[str, str]
    signature_ok: bool


@dataclass
class EventReceiver:
    """An events endpoint on loopback that verifies signatures and keeps what it got."""

    secret: str
    # How signatures are checked; tests pass the product docs' own verifier.
    verifier: Callable[[bytes, str, str], None] = verify
    events: list[ReceivedEvent] = field(default_factory=list)
    status: int = 200
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            self.verifier(raw, request.headers.get("X-Sautikit-Signature", ""), self.secret)
            ok = True
        except Exception:
            ok = False
        if self.status // 100 != 2:
            return web.Response(status=self.status)
        body = json.loads(raw)
        self.events.append(
            ReceivedEvent(time.time(), body.get("kind", ""), body, dict(request.headers), ok)
        )
        self.changed.set()
        return web.Response(status=200)

    async def start(self, port: int = 0) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/events", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = runner.addresses[0][1]
        return runner, f"http://127.0.0.1:{bound}/events"

    async def wait_for(self, pred: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not pred(self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return bool(pred(self.events))
        return True


async def run_demo(verbose: bool = False) -> int:
    from config.settings import load_settings
    from gateway.logs import setup_logging
    from gateway.node import Node
    from media.audio import active_duration, read_wav, rms_dbfs
    from media.endpoint import EndpointConfig, SipEndpoint

    setup_logging("INFO" if verbose else "WARNING", False, "demo")
    work = Path(tempfile.mkdtemp(prefix="sautikit-demo-"))
    secret = secrets.token_hex(16)
    receiver = EventReceiver(secret)
    recv_runner, events_url = await receiver.start()
    sip_port, api_port = free_port(both=True), free_port()
    os.environ.update(
        {
            "SAUTIKIT_SIP__LISTEN": f"127.0.0.1:{sip_port}",
            "SAUTIKIT_API__LISTEN": f"127.0.0.1:{api_port}",
            "SAUTIKIT_STORAGE__DIR": str(work / "var"),
            "SAUTIKIT_CONTROL_PLANE__EVENTS_URL": events_url,
            "SAUTIKIT_CONTROL_PLANE__SECRET": secret,
            "SAUTIKIT_LOG__LEVEL": "INFO" if verbose else "WARNING",
            "SAUTIKIT_WORKERS__COUNT": "1",
            "SAUTIKIT_KAMAILIO__MODE": "off",
            "SAUTIKIT_WEBRTC__ENABLED": "false",  # browsers need the managed front
            "SAUTIKIT_MEDIA__RTP_PORT_START": str(free_port(socket.SOCK_DGRAM) // 2 * 2),
        }
    )
    settings = load_settings(None)
    node = Node(settings, None)
    print(f"demo: gateway on sip:127.0.0.1:{sip_port} (api :{api_port}), storage {work}")
    await node.start()
    loop = asyncio.get_running_loop()
    phone = SipEndpoint(
        loop,
        EndpointConfig(
            sip_host="127.0.0.1",
            sip_port=free_port(socket.SOCK_DGRAM),
            transports=("udp",),
            rtp_port=free_port(socket.SOCK_DGRAM) // 2 * 2,
            rtp_port_range=8,
            max_calls=2,
        ),
    )
    phone.start()
    heard = work / "heard.wav"
    t0 = time.time()
    try:
        call = phone.make_call(f"sip:+254700000001@127.0.0.1:{sip_port}")
        await asyncio.wait_for(call.answer(), 15)
        rec = await call.record(
            heard, max_length_s=30, silence_timeout_s=0, finish_on_key="", beep=None
        )
        got_final = await receiver.wait_for(
            lambda evs: any(e.kind in ("call.completed", "call.failed") for e in evs), 15
        )
    finally:
        phone.stop()
        await node.stop()
        await recv_runner.cleanup()
    print("\nevent timeline (received by a signature-checking receiver):")
    for e in receiver.events:
        data = e.body.get("data", {})
        extra = {
            k: data[k]
            for k in ("status", "duration_seconds", "hangup_cause", "reason")
            if k in data
        }
        print(
            f"  +{e.at - t0:6.2f}s  {e.kind:<16} signature={'ok' if e.signature_ok else 'BAD'}"
            f"  {json.dumps(extra) if extra else ''}"
        )
    x, rate = read_wav(heard)
    print(
        f"\nthe caller heard {rec.duration_s:.2f} s of audio ({rate} Hz): "
        f"{active_duration(x, rate):.2f} s non-silent, level {rms_dbfs(x):.1f} dBFS; "
        f"call ended by {rec.ended_by}"
    )
    print(f"recording of what the caller heard: {heard}")
    ok = (
        got_final
        and all(e.signature_ok for e in receiver.events)
        and active_duration(x, rate) > 1.0
    )
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1
