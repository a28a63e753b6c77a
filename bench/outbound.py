#!/usr/bin/env python3
"""Outbound calls on a real node: setup time over sequential calls, and the highest create rate
one node places with 0 failures, next to its inbound setup rate in the same run.

Starts, on 127.0.0.1, all real:
  * a voice app (aiohttp) answering every POST with
    {"actions":[{"say":{"text":"Hello."}},{"hangup":{}}]} and stamping each request (entered,
    replied), and an events receiver (gateway.demo.EventReceiver, signatures checked);
  * a node, `python -m gateway.cli run --config FILE`: supervisor + --workers workers
    (calls_per_worker 4, reserved_slots 0) behind the managed Kamailio front (flood_limit 0),
    one `[[numbers]]` entry (the caller id, events to the receiver) and one `[[trunks]]` entry
    (max_cps 10000) pointing at
  * the carrier: a raw-UDP SIP UAS in this process (no SIP stack): INVITE -> 180 + 200 with
    SDP pointing at its own RTP socket (Record-Route copied), ACK, then either the gateway's BYE
    (answered 200) or its own BYE through the route set after --hold-ms. Its SIP and RTP
    sockets carry SO_TIMESTAMPNS, so every arrival is stamped by the kernel (wall clock).

Phase 1, setup (--calls N, one at a time; each call is created, rung, answered, played to, hung
up by the document and its final event received before the next): per call
  t0 = just before the bench's HTTP POST /v1/calls leaves (time.time(), same process),
  t1 = the INVITE arrived at the carrier (kernel stamp),
  t2 = the carrier sent its 200 OK (time.time() just before sendto),
  t3 = the first RTP packet of the prompt arrived at the carrier (kernel stamp; the first
       packet whose audio is above -40 dBFS: the workers send RTP silence from the answer on,
       with VAD off, so the first packet of any kind is printed on its own line).
Span a = t1 - t0 (API request -> INVITE on the wire), span b = t3 - t2 (answer -> prompt).
Span b holds the answer's voice callback fetch (the app's own stamps split it) and the TTS
prompt's leading silence, measured from the cached WAV and printed. The first --warmup calls
(TTS synthesis, first fetch of each worker) are made and checked but left out of the figures.

Phase 2, rates (--rates 10,...,70, --step-s seconds each): outbound creates paced
at R/s (open loop, each POST on its own task); each call runs the same document and the
gateway's hangup ends it (about 0.8 s a call; --hold-ms MS makes the carrier hang up MS after
ACK instead). A call fails if the create is not 201, its INVITE, 200/ACK or BYE/200 do not all
happen at the carrier, or its final event is not exactly one call.completed. Then the same node
takes inbound calls at the same steps: SIPp through the front (bench/sipp/uac_rate.xml, which
waits for the gateway's BYE; uac_setup.xml -d MS with --hold-ms), a call failing if SIPp fails
it or its final event is not exactly one call.completed. Each ramp stops at its first step with
a failure, or where fewer than 95 % of the asked rate were placed (INVITEs at the carrier over
the step; the API queues a create up to 5 s for a free slot, so an overloaded node shows as a
lower rate before it shows as failures). The figure is the highest clean step, and the ratio
outbound / inbound. Per step: peak calls live at the carrier (against workers x 4 slots),
create -> INVITE and create -> 201 latency, and CPU (machine, node, this process, SIPp, and
what other work on the machine used).

Every call of every phase must have exactly one final event at the receiver, correctly signed.
Exits 1 when a setup call fails, a count does not add up, or a ramp has no clean step.

usage: .venv/bin/python bench/outbound.py [--calls 100] [--warmup 3] [--workers 16]
           [--rates 10,20,30,40,45,50,55,60,65,70] [--step-s 3] [--hold-ms 0] [--no-setup]
           [--no-rates] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import wave
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.demo import EventReceiver, free_port, free_port_block  # noqa: E402

UAC_HANGS_UP = ROOT / "bench" / "sipp" / "uac_setup.xml"  # the carrier BYEs after -d MS
UAC_WAITS = ROOT / "bench" / "sipp" / "uac_rate.xml"  # the gateway's BYE ends the call
NUMBER = "+254700000001"  # the caller id (outbound) and the number called (inbound)
DEST_BASE = 254722100000  # outbound call i rings +DEST_BASE+i: the carrier matches it by R-URI
DOCUMENT = {"actions": [{"say": {"text": "Hello."}}, {"hangup": {}}]}
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not name it
FINAL = ("call.completed", "call.failed")
KEEP_UP = 0.95  # a step counts only if the node placed at least this share of its rate
LOUD = 328  # |sample| above this (-40 dBFS) is audio, not the workers' RTP silence


# --------------------------------------------------------------------------- G.711 levels


def _alaw(a: int) -> int:
    a ^= 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t += 8 if seg == 0 else 0x108
    if seg > 1:
        t <<= seg - 1
    return t


def _ulaw(u: int) -> int:
    u = ~u & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return abs(t - 0x84)


LEVEL = {
    8: bytes(min(255, _alaw(b) >> 7) for b in range(256)),
    0: bytes(min(255, _ulaw(b) >> 7) for b in range(256)),
}  # |sample| / 128 per byte


def loud(pt: int, payload: bytes) -> bool:
    table = LEVEL.get(pt)
    return table is not None and max(payload.translate(table), default=0) > LOUD >> 7


def kernel_stamp(anc: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])
            return sec + nsec / 1e9
    return time.time()


def stamped_socket(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    return s


def recv_all(sock: socket.socket) -> list[tuple[bytes, tuple[str, int], float]]:
    out = []
    while True:
        try:
            data, anc, _flags, addr = sock.recvmsg(65535, socket.CMSG_SPACE(16))
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:  # ICMP errors surface here on UDP; nothing to read
            return out
        out.append((data, addr, kernel_stamp(anc)))


# --------------------------------------------------------------------------- SIP, minimal

COMPACT = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
}


@dataclass
class Msg:
    first: str
    headers: list[tuple[str, str]]  # (lower-case full name, value), in order
    body: str

    @classmethod
    def parse(cls, data: bytes) -> Msg:
        text = data.decode("utf-8", "replace")
        head, _, body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        headers = []
        for ln in lines[1:]:
            name, sep, value = ln.partition(":")
            if sep:
                n = name.strip().lower()
                headers.append((COMPACT.get(n, n), value.strip()))
        return cls(lines[0], headers, body)

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def get(self, name: str) -> str:
        vals = self.all(name)
        return vals[0] if vals else ""

    @property
    def is_request(self) -> bool:
        return not self.first.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        return self.first.split(" ", 1)[0] if self.is_request else self.get("cseq").split()[-1]

    @property
    def code(self) -> int:
        return 0 if self.is_request else int(self.first.split()[1])


def split_list(value: str) -> list[str]:
    """A header value's comma-separated entries (commas inside <> or quotes kept)."""
    out, cur, depth, quoted = [], "", 0, False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def uri_of(value: str) -> str:
    return value[value.index("<") + 1 : value.index(">")] if "<" in value else value.split(";")[0]


def hostport(uri: str) -> tuple[str, int]:
    rest = uri.split(":", 1)[1]
    rest = rest.split("@", 1)[-1].split(";", 1)[0].split("?", 1)[0]
    host, _, port = rest.partition(":")
    return host, int(port or 5060)


def user_of(uri: str) -> str:
    rest = uri.split(":", 1)[1]
    return rest.split("@", 1)[0] if "@" in rest else ""


def sdp_answer(offer: str, rtp_port: int) -> tuple[str, int]:
    """(SDP answer, payload type): PCMA when offered, else PCMU."""
    m = next((ln for ln in offer.splitlines() if ln.startswith("m=audio")), "m=audio 0 RTP/AVP 8")
    pts = m.split()[3:]
    pt = 8 if "8" in pts or "0" not in pts else 0
    name = "PCMA" if pt == 8 else "PCMU"
    sdp = (
        "v=0\r\no=carrier 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {rtp_port} RTP/AVP {pt}\r\na=rtpmap:{pt} {name}/8000\r\na=sendrecv\r\n"
    )
    return sdp, pt


# --------------------------------------------------------------------------- the carrier


@dataclass
class UasCall:
    call_id: str
    user: str  # the Request-URI's user part: which create this is
    step: int
    invite: Msg
    src: tuple[str, int]
    invite_at: float  # kernel stamps and time.time(), wall clock seconds
    to_tag: str = field(default_factory=lambda: secrets.token_hex(4))
    pt: int = 8
    ok_sent_at: float | None = None
    ack_at: float | None = None
    first_rtp_at: float | None = None
    first_audio_at: float | None = None
    rtp_packets: int = 0
    bye_at: float | None = None
    ended_by: str = ""  # "gateway" (its BYE reached us) or "callee" (our BYE answered)
    last_response: bytes = b""
    rtp: socket.socket | None = None
    rtcp: socket.socket | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    our_bye: bytes = b""
    our_bye_to: tuple[str, int] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.ok_sent_at and self.ack_at and self.ended_by) and not self.problems


class Carrier:
    """A raw-UDP SIP UAS behind the trunk: answers at once, stamps what arrives."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = stamped_socket()
        self.port = self.sock.getsockname()[1]
        self.calls: dict[str, UasCall] = {}
        self.by_user: dict[str, UasCall] = {}
        self.step = 0
        self.hold_s: float | None = None  # our BYE this long after ACK; None: wait for theirs
        self.changed = asyncio.Event()
        self.stray: Counter[str] = Counter()  # requests we did not expect, by method
        self.loop.add_reader(self.sock, self._readable)

    def close(self) -> None:
        self.loop.remove_reader(self.sock)
        self.sock.close()
        for c in self.calls.values():
            self._close_media(c)

    def live(self) -> int:
        return sum(1 for c in self.calls.values() if not c.ended_by)

    # -- wire ----------------------------------------------------------------------------------
    def _send(self, data: bytes, to: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(data, to)

    def _response(
        self,
        req: Msg,
        code: int,
        reason: str,
        *,
        tag: str = "",
        extra: str = "",
        body: str = "",
        record_route: bool = False,
    ) -> bytes:
        lines = [f"SIP/2.0 {code} {reason}"]
        lines += [f"Via: {v}" for v in req.all("via")]
        if record_route:
            lines += [f"Record-Route: {v}" for v in req.all("record-route")]
        lines.append(f"From: {req.get('from')}")
        to = req.get("to")
        lines.append(f"To: {to}" + (f";tag={tag}" if tag and ";tag=" not in to else ""))
        lines += [f"Call-ID: {req.get('call-id')}", f"CSeq: {req.get('cseq')}"]
        if extra:
            lines.append(extra)
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    def _readable(self) -> None:
        for data, addr, at in recv_all(self.sock):
            if not data.strip():
                continue  # keep-alive CRLF
            try:
                msg = Msg.parse(data)
                self._on_message(msg, addr, at)
            except Exception as e:  # a bench bug, not the gateway's: say so, keep going
                self.stray[f"unparsed ({type(e).__name__}: {e})"] += 1
        self.changed.set()

    def _on_message(self, msg: Msg, addr: tuple[str, int], at: float) -> None:
        cid = msg.get("call-id")
        call = self.calls.get(cid)
        if not msg.is_request:
            if call is not None and msg.method == "BYE" and msg.code >= 200:
                self._ended(call, "callee", at)
            return
        method = msg.method
        if method == "INVITE" and call is None:
            self._on_invite(msg, addr, at)
        elif method == "INVITE":
            assert call is not None
            if ";tag=" in msg.get("to"):  # a re-INVITE: same answer again
                sdp, _ = sdp_answer(msg.body, call.rtp.getsockname()[1] if call.rtp else 9)
                self._send(
                    self._response(
                        msg,
                        200,
                        "OK",
                        tag=call.to_tag,
                        body=sdp,
                        extra=self._contact(),
                        record_route=True,
                    ),
                    addr,
                )
            elif call.last_response:  # a retransmission
                self._send(call.last_response, addr)
        elif method == "ACK" and call is not None:
            if call.ack_at is None:
                call.ack_at = at
                self._cancel_timers(call)
                if self.hold_s is not None:
                    call.timers.append(self.loop.call_later(self.hold_s, self._bye, call))
        elif method == "BYE" and call is not None:
            self._send(self._response(msg, 200, "OK"), addr)
            self._ended(call, "gateway", at)
        elif method == "CANCEL" and call is not None:
            self._send(self._response(msg, 200, "OK"), addr)
            call.problems.append("the gateway CANCELed")
        elif method == "OPTIONS":
            self._send(self._response(msg, 200, "OK", tag=secrets.token_hex(4)), addr)
        elif method != "ACK":
            self.stray[method] += 1
            self._send(
                self._response(
                    msg, 200 if call else 481, "OK" if call else "Call/Transaction Does Not Exist"
                ),
                addr,
            )

    def _contact(self) -> str:
        return f"Contact: <sip:carrier@127.0.0.1:{self.port}>"

    def _on_invite(self, msg: Msg, addr: tuple[str, int], at: float) -> None:
        user = user_of(msg.first.split()[1]).lstrip("+")
        call = UasCall(msg.get("call-id"), user, self.step, msg, addr, at)
        self.calls[call.call_id] = call
        if user in self.by_user:
            call.problems.append(f"a second INVITE for {user}")
        self.by_user.setdefault(user, call)
        call.rtp, call.rtcp = rtp_pair()
        self.loop.add_reader(call.rtp, self._rtp_readable, call)
        self.loop.add_reader(call.rtcp, lambda s=call.rtcp: recv_all(s))
        sdp, call.pt = sdp_answer(msg.body, call.rtp.getsockname()[1])
        ringing = self._response(
            msg, 180, "Ringing", tag=call.to_tag, extra=self._contact(), record_route=True
        )
        ok = self._response(
            msg, 200, "OK", tag=call.to_tag, extra=self._contact(), body=sdp, record_route=True
        )
        self._send(ringing, addr)
        call.last_response = ok
        call.ok_sent_at = time.time()
        self._send(ok, addr)
        self._retransmit(call, ok, addr, 0.5, "200 OK without an ACK")

    def _retransmit(
        self, call: UasCall, data: bytes, to: tuple[str, int], after: float, what: str
    ) -> None:
        def again() -> None:
            if after >= 4:
                call.problems.append(what)
                if what.startswith("200"):
                    self._ended(call, "", time.time())
                return
            self._send(data, to)
            self._retransmit(call, data, to, after * 2, what)

        call.timers.append(self.loop.call_later(after, again))

    def _bye(self, call: UasCall) -> None:
        """Our BYE: through the route set (the INVITE's Record-Route, in order) to the
        gateway's Contact."""
        if call.ended_by:
            return
        inv = call.invite
        routes = [r for v in inv.all("record-route") for r in split_list(v)]
        target = uri_of(inv.get("contact"))
        dest = hostport(uri_of(routes[0])) if routes else hostport(target)
        frm = inv.get("to")
        lines = [
            f"BYE {target} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
            *(f"Route: {r}" for r in routes),
            f"From: {frm}" + (f";tag={call.to_tag}" if ";tag=" not in frm else ""),
            f"To: {inv.get('from')}",
            f"Call-ID: {call.call_id}",
            "CSeq: 1 BYE",
            "Max-Forwards: 70",
            "Content-Length: 0",
        ]
        call.our_bye = ("\r\n".join(lines) + "\r\n\r\n").encode()
        call.our_bye_to = dest
        call.bye_at = time.time()
        self._send(call.our_bye, dest)
        self._retransmit(call, call.our_bye, dest, 0.5, "our BYE unanswered")

    def _ended(self, call: UasCall, by: str, at: float) -> None:
        if call.ended_by:
            return
        call.ended_by = by or "timeout"
        if by == "gateway":
            call.bye_at = at
        self._cancel_timers(call)
        # Late RTP still arrives for a moment; keep the sockets open briefly (no ICMP noise).
        self.loop.call_later(0.5, self._close_media, call)
        self.changed.set()

    def _cancel_timers(self, call: UasCall) -> None:
        for t in call.timers:
            t.cancel()
        call.timers.clear()

    def _close_media(self, call: UasCall) -> None:
        for s in (call.rtp, call.rtcp):
            if s is not None and s.fileno() >= 0:
                self.loop.remove_reader(s)
                s.close()

    def _rtp_readable(self, call: UasCall) -> None:
        assert call.rtp is not None
        for data, _addr, at in recv_all(call.rtp):
            if len(data) < 12 or data[0] >> 6 != 2:
                continue
            call.rtp_packets += 1
            if call.first_rtp_at is None:
                call.first_rtp_at = at
            if call.first_audio_at is None:
                cc, ext = data[0] & 0x0F, data[0] & 0x10
                off = 12 + 4 * cc
                if ext and len(data) >= off + 4:
                    off += 4 + 4 * struct.unpack("!H", data[off + 2 : off + 4])[0]
                if loud(data[1] & 0x7F, data[off:]):
                    call.first_audio_at = at

    async def wait(self, pred: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True


def rtp_pair() -> tuple[socket.socket, socket.socket]:
    """An RTP socket on an even port and its RTCP socket on the next one."""
    for _ in range(100):
        rtp = stamped_socket()
        port = rtp.getsockname()[1]
        if port % 2 == 0 and port < 65535:
            try:
                return rtp, stamped_socket(port + 1)
            except OSError:
                pass
        rtp.close()
    raise RuntimeError("no free RTP port pair")


# --------------------------------------------------------------------------- voice app, events


class VoiceApp:
    def __init__(self) -> None:
        self.secret = secrets.token_hex(8)
        self.requests: dict[str, list[tuple[float, float]]] = {}  # callId -> (entered, replied)
        self.statuses: Counter[str] = Counter()
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        entered = time.time()
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        reply = web.json_response(DOCUMENT)
        self.requests.setdefault(form.get("callId", ""), []).append((entered, time.time()))
        self.statuses[f"{form.get('direction')}:{form.get('callStatus')}"] += 1
        return reply

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/voice"


def finals_by_call(rec: EventReceiver, start: int = 0) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in rec.events[start:]:
        if e.kind in FINAL:
            out.setdefault(e.body["data"].get("call_id", ""), []).append(e.kind)
    return out


# --------------------------------------------------------------------------- the node


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    sip_port: int
    api: str
    token: str
    work: Path
    log: Path


def write_config(
    work: Path, args: argparse.Namespace, app: VoiceApp, events_url: str, carrier_port: int
) -> tuple[Path, int, str, str]:
    sip_port, api_port, token = free_port(both=True), free_port(), secrets.token_hex(16)
    rtp_per_worker = 40
    path = work / "gateway.toml"
    # Worker SIP ports and RTP ranges below the ephemeral range, where the bench's own
    # sockets and SIPp's come from.
    path.write_text(f"""
[sip]
listen = "127.0.0.1:{sip_port}"
[api]
listen = "127.0.0.1:{api_port}"
token = "{token}"
[callbacks]
timeout_s = 5
allow_http = true
allow_private = true
[storage]
dir = "{work / "var"}"
[media]
rtp_port_start = {free_port_block(args.workers * rtp_per_worker, 10000, 32000)}
rtp_ports_per_worker = {rtp_per_worker}
[workers]
count = {args.workers}
calls_per_worker = 4
reserved_slots = 0
sip_port_start = {free_port_block(args.workers, 10000, 32000)}
[kamailio]
mode = "managed"
flood_limit = 0
[log]
level = "INFO"

[[numbers]]
e164 = "{NUMBER}"
number_id = "num_bench"
workspace_id = "ws_bench"
voice_callback_url = "{app.url}"
webhook_secret = "{app.secret}"
events_url = "{events_url}"

[[trunks]]
name = "carrier"
address = "127.0.0.1:{carrier_port}"
transport = "udp"
max_cps = 10000
""")
    return path, sip_port, f"http://127.0.0.1:{api_port}", token


def start_node(
    config: Path, sip_port: int, api: str, token: str, work: Path, timeout: float = 60
) -> Node:
    log = work / "gateway.log"
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        start_new_session=True,  # its own process group: stopped as a whole, and only it
    )  # fmt: skip
    out.close()
    node = Node(proc, sip_port, api, token, work, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"sautikit-gateway ready" in log.read_bytes():
            return node
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_node(node)
    sys.exit(f"node not ready (exit {proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")


def stop_node(node: Node) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.proc.pid, signal.SIGKILL)  # whatever of our group outlived it
    for pgid in KAMAILIO_SESSIONS:  # the node's Kamailio, if it outlived the node
        with contextlib.suppress(OSError):
            if "(kamailio)" in Path(f"/proc/{pgid}/stat").read_text():
                os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.proc.wait(5)


# --------------------------------------------------------------------------- phases


def pct(sorted_xs: list[float], p: float) -> float:
    """Nearest rank (p90 of 100 values = the 90th smallest)."""
    return sorted_xs[max(0, math.ceil(p / 100 * len(sorted_xs)) - 1)]


def summary(xs: list[float]) -> str:
    if not xs:
        return "no samples"
    s = sorted(xs)
    return (
        f"min {s[0]:.1f}  median {statistics.median(s):.1f}  p90 {pct(s, 90):.1f}  "
        f"p99 {pct(s, 99):.1f}  max {s[-1]:.1f}  (n={len(s)})"
    )


@dataclass
class Create:
    index: int
    to: str
    t0: float = 0.0  # time.time() just before the POST
    t_resp: float = 0.0
    status: int = 0
    call_id: str = ""
    error: str = ""


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        node: Node,
        carrier: Carrier,
        app: VoiceApp,
        rec: EventReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        self.args, self.node, self.carrier, self.app, self.rec = args, node, carrier, app, rec
        self.http = http
        self.next_index = 0
        self.creates: list[Create] = []
        self.problems: list[str] = []  # counts that do not add up: exit 1
        self.detail: list[str] = []  # calls whose final event was not call.completed

    async def create(self) -> Create:
        c = Create(self.next_index, f"+{DEST_BASE + self.next_index}")
        self.next_index += 1
        self.creates.append(c)
        body = {
            "to": c.to,
            "from": NUMBER,
            "voice_callback_url": self.app.url,
            "client_request_id": f"bench-{c.index}",
        }
        headers = {"Authorization": f"Bearer {self.node.token}"}
        c.t0 = time.time()
        try:
            async with self.http.post(
                f"{self.node.api}/v1/calls", json=body, headers=headers
            ) as resp:
                text = await resp.text()
                c.t_resp, c.status = time.time(), resp.status
            if c.status == 201:
                c.call_id = json.loads(text)["call_id"]
            else:
                c.error = text[:300]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
            c.t_resp, c.error = time.time(), f"{type(e).__name__}: {e}"
        return c

    def check_create(self, c: Create, finals: dict[str, list[str]]) -> str:
        """Why this call failed, or ''."""
        if c.status != 201:
            return f"create {c.status or 'error'}: {c.error}"
        call = self.carrier.by_user.get(c.to.lstrip("+"))
        if call is None:
            return "no INVITE at the carrier"
        if not call.ok:
            return "carrier: " + (
                "; ".join(call.problems) or f"ack={call.ack_at} ended_by={call.ended_by!r}"
            )
        kinds = finals.get(c.call_id, [])
        if kinds != ["call.completed"]:
            last = next(
                (
                    e.body["data"]
                    for e in reversed(self.rec.events)
                    if e.kind in FINAL and e.body["data"].get("call_id") == c.call_id
                ),
                {},
            )
            detail = " ".join(
                f"{k}={last[k]}"
                for k in ("status", "sip_code", "reason", "answered_at")
                if k in last
            )
            self.detail.append(
                f"{c.call_id} ({c.to}): {kinds} {detail} "
                f"{last.get('message', '')!r}; carrier ended_by={call.ended_by}"
            )
            return f"final events {kinds}" + (
                f" ({last.get('status')}, {last.get('reason')})" if last else ""
            )
        return ""

    # -- phase 1 -------------------------------------------------------------------------------
    async def setup_phase(self) -> dict[str, Any]:
        self.carrier.hold_s = None  # the document's hangup ends every call
        rows: list[dict[str, float]] = []
        meta: list[tuple[str, float, float]] = []  # call_id, 200 sent, app entered
        failed: list[str] = []
        total = self.args.warmup + self.args.calls
        t_start = time.monotonic()
        for i in range(total):
            c = await self.create()
            ok = c.status == 201 and await self.rec.wait_for(
                lambda evs, cid=c.call_id: any(
                    e.kind in FINAL and e.body["data"].get("call_id") == cid for e in evs
                ),
                15,
            )
            call = self.carrier.by_user.get(c.to.lstrip("+"))
            if call is not None:
                await self.carrier.wait(lambda call=call: bool(call.ended_by), 5)
            why = self.check_create(c, finals_by_call(self.rec))
            if not why and not ok:
                why = "no final event within 15 s"
            if not why and call is not None and (call.first_audio_at is None):
                why = f"no audio reached the carrier ({call.rtp_packets} RTP packets)"
            if why:
                failed.append(f"call {i} ({c.call_id or c.to}): {why}")
                continue
            assert call is not None and call.ok_sent_at is not None
            assert call.first_rtp_at is not None and call.first_audio_at is not None
            if i < self.args.warmup:
                continue
            app = self.app.requests.get(c.call_id, [])
            row = {
                "a": call.invite_at - c.t0,
                "b": call.first_audio_at - call.ok_sent_at,
                "resp": c.t_resp - c.t0,
                "invite_to_resp": c.t_resp - call.invite_at,
                "b_any": call.first_rtp_at - call.ok_sent_at,
                "ack": (call.ack_at or 0) - call.ok_sent_at,
            }
            if len(app) == 1 and call.ok_sent_at <= app[0][0] <= app[0][1] <= call.first_audio_at:
                row["to_app"] = app[0][0] - call.ok_sent_at
                row["in_app"] = app[0][1] - app[0][0]
                row["app_to_audio"] = call.first_audio_at - app[0][1]
            rows.append(row)
            meta.append((c.call_id, call.ok_sent_at, app[0][0] if len(app) == 1 else 0.0))
            await asyncio.sleep(self.args.pause_ms / 1000)
        # Where span b goes inside the worker, from its log (ms stamps, each line written
        # after its event reached the outbox): 200 sent -> call.answered written -> app.
        answered = logged_events(self.node.log, "call.answered")
        for row, (call_id, ok_at, app_at) in zip(rows, meta, strict=True):
            at = answered.get(call_id)
            if at is not None:
                row["to_answered_log"] = at - ok_at
                if app_at:
                    row["answered_log_to_app"] = app_at - at
        return {"rows": rows, "failed": failed, "total": total, "wall": time.monotonic() - t_start}

    # -- phase 2: outbound ramp ----------------------------------------------------------------
    async def outbound_step(self, step: int, rate: float) -> dict[str, Any]:
        self.carrier.step = step
        self.carrier.hold_s = self.args.hold_ms / 1000 if self.args.hold_ms else None
        n = max(1, round(rate * self.args.step_s))
        ev0 = len(self.rec.events)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        peak = 0
        tasks = []
        for i in range(n):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.create()))
            peak = max(peak, self.carrier.live())
        creates: list[Create] = await asyncio.gather(*tasks)
        ids = {c.call_id for c in creates if c.call_id}

        def done() -> bool:
            fin = finals_by_call(self.rec, ev0)
            return all(i in fin for i in ids) and all(
                (call := self.carrier.by_user.get(c.to.lstrip("+"))) is None or call.ended_by
                for c in creates
            )

        while not done():
            peak = max(peak, self.carrier.live())
            if not await self.carrier.wait(done, 0.05) and (
                loop.time() - start > self.args.step_s + 20
            ):
                break
        await asyncio.sleep(0.3)  # a duplicate final event would arrive about now
        finals = finals_by_call(self.rec, ev0)
        why = [(c, w) for c in creates if (w := self.check_create(c, finals))]
        invites = sorted(c.invite_at for c in self.carrier.calls.values() if c.step == step)
        span = invites[-1] - invites[0] if len(invites) > 1 else 0.0
        stray = set(finals) - ids
        if stray:
            self.problems.append(
                f"outbound step {rate}/s: final events of {len(stray)} calls "
                "the bench did not create"
            )
        for cid, kinds in finals.items():
            if len(kinds) > 1:
                self.problems.append(f"call {cid}: {len(kinds)} final events {kinds}")
        a = [
            (call.invite_at - c.t0) * 1000
            for c in creates
            if (call := self.carrier.by_user.get(c.to.lstrip("+")))
        ]
        return {
            "rate": rate,
            "calls": n,
            "failed": len(why),
            "why": Counter(w.split(":")[0] if w.startswith("create") else w for _, w in why),
            "achieved": (len(invites) - 1) / span if span else 0.0,
            "peak": peak,
            "a": a,
            "resp": [(c.t_resp - c.t0) * 1000 for c in creates],
        }

    # -- phase 3: inbound ramp -----------------------------------------------------------------
    async def inbound_step(self, step: int, rate: float) -> dict[str, Any]:
        n = max(1, round(rate * self.args.step_s))
        ev0 = len(self.rec.events)
        d = self.node.work / f"sipp-in-{step}"
        d.mkdir()
        cmd = [
            "sipp", "-sf", str(UAC_HANGS_UP if self.args.hold_ms else UAC_WAITS),
            f"127.0.0.1:{self.node.sip_port}", "-s", NUMBER, "-r", f"{rate:g}", "-m", str(n),
            *(["-d", str(self.args.hold_ms)] if self.args.hold_ms else []),
            "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM, both=True)),
            "-mp", str(free_port(socket.SOCK_DGRAM) // 2 * 2),
            "-trace_stat", "-stf", "stat.csv", "-fd", "1", "-trace_err",
            "-trace_rtt", "-rtt_freq", "1",
            "-recv_timeout", "10000", "-timeout", str(int(self.args.step_s + 30)),
            "-timeout_error", "-nostdin",
        ]  # fmt: skip
        with (d / "sipp.out").open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=d, stdout=out, stderr=subprocess.STDOUT
            )
            rc = await proc.wait()
        stat = read_stat(d / "stat.csv")
        ok = int(stat.get("SuccessfulCall(C)", 0) or 0)
        sipp_failed = int(stat.get("FailedCall(C)", 0) or 0)
        # Every call's final event (the carrier hung up first; the gateway reports it).
        await self.rec.wait_for(lambda evs: inbound_finals(evs, ev0) >= ok + sipp_failed, 10)
        await asyncio.sleep(0.3)
        finals = {cid: k for cid, k in finals_by_call(self.rec, ev0).items()}
        completed = sum(1 for k in finals.values() if k == ["call.completed"])
        for cid, kinds in finals.items():
            if len(kinds) > 1:
                self.problems.append(f"call {cid}: {len(kinds)} final events {kinds}")
        bad_events = len(finals) - completed
        failed = max(n - ok, n - completed, bad_events)
        why: Counter[str] = Counter()
        if rc != 0:
            why[f"sipp exit {rc}"] += 1
        if sipp_failed:
            why["SIPp failed calls"] += sipp_failed
            for k, v in stat.items():  # SIPp's own failure counters (timeouts, unexpected...)
                if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)":
                    with contextlib.suppress(ValueError):
                        if int(v):
                            why[k.removesuffix("(C)")] += int(v)
            for err in sorted(d.glob("*_errors.log")):
                for line in err.read_text(errors="replace").splitlines():
                    if "Aborting call" in line or "unexpected" in line.lower():
                        self.detail.append(f"inbound {rate:g}/s, SIPp: {line.strip()[:200]}")
                        break
        if completed != n:
            why[f"{completed} call.completed for {n} calls"] += 1
        if bad_events:
            why["call.failed or duplicate finals"] += bad_events
        rtt, sent = read_rtt(d)
        span = (sent[-1] - sent[0]) / 1000 if len(sent) > 1 else 0.0
        return {
            "rate": rate,
            "calls": n,
            "failed": failed if (failed or rc) else 0,
            "why": why,
            "achieved": (len(sent) - 1) / span if span else 0.0,
            "rtt": rtt,
            "cmd": cmd,
        }


def logged_events(log: Path, kind: str) -> dict[str, float]:
    """call_id -> wall time of the gateway's `call <id>: <kind> <event id>` log line."""
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) > 7 and parts[7] == kind and parts[4] == "gateway.calls.writer:":
            with contextlib.suppress(ValueError):
                at = datetime.strptime(f"{parts[0]} {parts[1]}", "%Y-%m-%d %H:%M:%S,%f")
                out[parts[6].rstrip(":")] = at.timestamp()
    return out


def inbound_finals(evs: list[Any], start: int) -> int:
    return sum(
        1 for e in evs[start:] if e.kind in FINAL and e.body["data"].get("direction") == "inbound"
    )


def read_stat(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    rows = list(csv.reader(path.open(), delimiter=";"))
    return dict(zip(rows[0], rows[-1], strict=False)) if len(rows) > 1 else {}


def read_rtt(work: Path) -> tuple[list[float], list[float]]:
    """SIPp's per-call INVITE -> 200 (-trace_rtt: ms, in its coarse clock ticks) and when each
    INVITE left (ms since SIPp started: the 200's Date_ms minus its rtd), in order."""
    files = sorted(work.glob("*_rtt.csv"))
    if not files:
        return [], []
    rows = list(csv.reader(files[0].open(), delimiter=";"))
    head = [h.strip() for h in rows[0]]
    col, at = head.index("response_time_ms"), head.index("Date_ms")
    pairs = [(float(r[col]), float(r[at])) for r in rows[1:] if len(r) > col and r[col].strip()]
    return [p[0] for p in pairs], sorted(a - rt for rt, a in pairs)


def leading_silence_ms(storage: Path) -> float | None:
    """The "Hello." prompt's leading silence: the cached TTS WAV, first sample above LOUD."""
    for wav in sorted((storage / "cache" / "tts").rglob("*.wav")):
        with contextlib.suppress(wave.Error, OSError), wave.open(str(wav)) as w:
            if w.getsampwidth() != 2:
                continue
            rate, frames = w.getframerate(), w.readframes(w.getnframes())
            samples = struct.unpack(f"<{len(frames) // 2}h", frames)
            first = next((i for i, s in enumerate(samples) if abs(s) > LOUD), None)
            if first is not None:
                return first / rate * 1000
    return None


TICK = os.sysconf("SC_CLK_TCK")
KAMAILIO_SESSIONS: set[int] = set()  # seen while the node ran: killed at the end if left over


def cpu_snapshot(session: int) -> dict[str, float]:
    """CPU seconds so far: the whole machine (busy, all), the node's processes (its session:
    supervisor, workers, Kamailio), this process, and its reaped children (SIPp)."""
    cols = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(cols[:3]) + sum(cols[5:8])  # user nice system + irq softirq steal
    procs = []  # (pid, ppid, session, cpu ticks, is kamailio)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (d / "stat").read_text()
            f = stat.rsplit(")", 1)[1].split()
            procs.append(
                (int(d.name), int(f[1]), int(f[3]), int(f[11]) + int(f[12]), "(kamailio)" in stat)
            )
    # The managed Kamailio runs in a session of its own, started by the supervisor.
    kam_sessions = {pid for pid, ppid, _, _, k in procs if k and ppid == session}
    KAMAILIO_SESSIONS.update(kam_sessions)
    node = sum(t for _, _, sid, t, _ in procs if sid == session or sid in kam_sessions)
    sup = sum(t for pid, _, _, t, _ in procs if pid == session)
    kam = sum(t for _, _, sid, t, _ in procs if sid in kam_sessions)
    me, kids = os.times(), os.times()
    return {
        "busy": busy / TICK,
        "all": (busy + cols[3] + cols[4]) / TICK,
        "node": node / TICK,
        "supervisor": sup / TICK,
        "kamailio": kam / TICK,
        "wall": time.monotonic(),
        "bench": me.user + me.system,
        "children": kids.children_user + kids.children_system,
    }


def cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


async def ramp(bench: Bench, kind: str, rates: list[float]) -> list[dict[str, Any]]:
    out = []
    for step, rate in enumerate(rates, start=1 if kind == "out" else 1001):
        c0 = cpu_snapshot(bench.node.proc.pid)
        r = await (
            bench.outbound_step(step, rate) if kind == "out" else bench.inbound_step(step, rate)
        )
        cpu = cpu_delta(c0, cpu_snapshot(bench.node.proc.pid))
        r["cpu"] = cpu
        # Placed fewer than KEEP_UP of the asked rate: creates queued (no free slot, or the
        # node behind on CPU); no failure, but not that rate either.
        r["behind"] = r["achieved"] < KEEP_UP * rate
        out.append(r)
        per = {
            k: 1000 * cpu[k] / r["calls"]
            for k in ("node", "bench", "children", "supervisor", "kamailio")
        }
        others = cpu["busy"] - cpu["node"] - cpu["bench"] - cpu["children"]
        r["supervisor_pct"] = 100 * cpu["supervisor"] / cpu["wall"]
        r["others_pct"] = 100 * others / cpu["all"]
        cpu_line = (
            f"machine busy {100 * cpu['busy'] / cpu['all']:.0f} % over the step "
            f"(not this run's: {r['others_pct']:.0f} %); CPU ms "
            f"per call: node {per['node']:.1f} (supervisor {per['supervisor']:.1f}, "
            f"Kamailio {per['kamailio']:.1f}, workers the rest), bench process "
            f"{per['bench']:.1f}, SIPp {per['children']:.1f}; supervisor "
            f"{r['supervisor_pct']:.0f} % of one core"
        )
        extra = (
            f"peak {r['peak']} live at the carrier, create->INVITE p50/p99 "
            f"{fmt_p(r['a'])}, create->201 p50/p99 {fmt_p(r['resp'])}"
            if kind == "out"
            else f"INVITE->200 (SIPp rtd, coarse) p50/p99 {fmt_p(r['rtt'])}"
        )
        print(
            f"    {kind}bound {rate:g}/s: {r['calls']} calls, {r['failed']} failed, achieved "
            f"{r['achieved']:.1f}/s; {extra}"
            + (f"; why: {dict(r['why'])}" if r["failed"] else "")
            + (f"; BEHIND: under {KEEP_UP:.0%} of {rate:g}/s placed" if r["behind"] else ""),
            flush=True,
        )
        print(f"      {cpu_line}", flush=True)
        if r["failed"] or r["behind"]:
            break
        await asyncio.sleep(1)
    return out


def hold_text(args: argparse.Namespace) -> str:
    return (
        f"the callee hangs up {args.hold_ms} ms after ACK"
        if args.hold_ms
        else "the document's hangup ends each call"
    )


def fmt_p(xs: list[float]) -> str:
    if not xs:
        return "-"
    s = sorted(xs)
    return f"{statistics.median(s):.1f}/{pct(s, 99):.1f} ms"


def clean_rate(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    clean = [s for s in steps if not s["failed"] and not s["behind"]]
    return clean[-1] if clean else None


async def run(args: argparse.Namespace, work: Path) -> int:
    app = VoiceApp()
    await app.start()
    rec = EventReceiver(secret=app.secret)
    rec_runner, events_url = await rec.start()
    carrier = Carrier()
    config, sip_port, api, token = write_config(work, args, app, events_url, carrier.port)
    node = await asyncio.to_thread(start_node, config, sip_port, api, token, work)
    setup: dict[str, Any] = {}
    out_steps: list[dict[str, Any]] = []
    in_steps: list[dict[str, Any]] = []
    bench: Bench | None = None
    try:
        await asyncio.sleep(2)  # the front's first probes mark every worker up
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        ) as http:
            bench = Bench(args, node, carrier, app, rec, http)
            if not args.no_setup:
                print(
                    f"  setup: {args.warmup} warm-up + {args.calls} sequential outbound calls",
                    flush=True,
                )
                setup = await bench.setup_phase()
            if not args.no_rates:
                print(
                    f"  rates: outbound ramp {args.rates} /s, {args.step_s:g} s a step, "
                    f"{hold_text(args)}",
                    flush=True,
                )
                out_steps = await ramp(bench, "out", args.rate_list)
                print(
                    "  rates: inbound ramp through the front (SIPp "
                    f"{(UAC_HANGS_UP if args.hold_ms else UAC_WAITS).name})",
                    flush=True,
                )
                in_steps = await ramp(bench, "in", args.rate_list)
    finally:
        await asyncio.to_thread(stop_node, node)
        carrier.close()
        await rec_runner.cleanup()
        if app.runner:
            await app.runner.cleanup()
    assert bench is not None
    return report(args, work, bench, setup, out_steps, in_steps)


def report(
    args: argparse.Namespace,
    work: Path,
    bench: Bench,
    setup: dict[str, Any],
    out_steps: list[dict[str, Any]],
    in_steps: list[dict[str, Any]],
) -> int:
    bad = list(bench.problems)
    unsigned = sum(1 for e in bench.rec.events if not e.signature_ok)
    if unsigned:
        bad.append(f"{unsigned} events with a bad signature")
    all_finals = finals_by_call(bench.rec)
    dup = [cid for cid, k in all_finals.items() if len(k) > 1]
    if dup:
        bad.append(f"{len(dup)} calls with more than one final event")
    for d in bench.detail[:10]:
        print(f"  not completed: {d}")
    if bench.carrier.stray:
        print(f"  carrier saw unexpected requests: {dict(bench.carrier.stray)}")
    print()
    if setup:
        rows = setup["rows"]
        ms = 1000.0

        def col(k: str) -> list[float]:
            return [r[k] * ms for r in rows if k in r]

        silence = leading_silence_ms(bench.node.work / "var")
        print(
            f"outbound call setup, {len(rows)} sequential calls (after {args.warmup} warm-up), ms:"
        )
        print(f"  a) API request -> INVITE at carrier  {summary(col('a'))}")
        print(f"     API request -> 201 response       {summary(col('resp'))}")
        print(f"  b) 200 OK sent -> first prompt RTP   {summary(col('b'))}")
        print(f"     200 OK sent -> first RTP (any)    {summary(col('b_any'))}  (silence)")
        print(f"     200 OK sent -> ACK at carrier     {summary(col('ack'))}")
        print(f"     200 OK sent -> app entered        {summary(col('to_app'))}")
        print(f"       200 OK sent -> call.answered logged  {summary(col('to_answered_log'))}")
        print(
            f"       call.answered logged -> app entered  "
            f"{summary(col('answered_log_to_app'))}  (log stamps: 1 ms steps)"
        )
        print(f"     app handling                      {summary(col('in_app'))}")
        print(f"     app reply -> first prompt RTP     {summary(col('app_to_audio'))}")
        print(
            f"     (b includes the callback fetch; the prompt WAV's leading silence is "
            f"{'unknown' if silence is None else f'{silence:.1f} ms'})"
        )
        print(
            f"  calls ok={setup['total'] - len(setup['failed'])} (warm-up included) "
            f"failed={len(setup['failed'])} wall={setup['wall']:.1f}s"
        )
        for f in setup["failed"][:10]:
            print(f"    FAILED {f}")
        if setup["failed"] or len(rows) != args.calls:
            bad.append(f"setup: {len(setup['failed'])} calls failed, {len(rows)} measured")
    if out_steps or in_steps:
        o, i = clean_rate(out_steps), clean_rate(in_steps)
        print(
            f"calls/s with 0 failures ({args.workers} workers x 4 slots, {args.step_s:g} s "
            f"steps, {hold_text(args)}):"
        )
        for name, best, steps in (("outbound", o, out_steps), ("inbound ", i, in_steps)):
            if best is None:
                print(f"  {name}: no clean step")
                bad.append(f"{name.strip()}: no clean step")
                continue
            last = steps[-1]
            end = (
                f"; {last['rate']:g}/s had {last['failed']} failed"
                if last["failed"]
                else f"; {last['rate']:g}/s placed only {last['achieved']:.1f}/s (0 failed)"
                if last["behind"]
                else " (the highest step tried: a lower bound)"
            )
            print(f"  {name}: {best['rate']:g}/s clean (achieved {best['achieved']:.1f}/s){end}")
        if o and i:
            print(f"  ratio outbound / inbound: {o['rate'] / i['rate']:.2f}")
        others = [st["others_pct"] for st in out_steps + in_steps]
        print(
            f"  CPU not this run's (other work on the machine) per step: "
            f"{min(others):.0f}-{max(others):.0f} % of the machine"
        )
    here = Path.cwd()
    py, script = (
        os.path.relpath(x, here) if x.startswith(f"{here}/") else x
        for x in (sys.executable, str(Path(__file__).absolute()))
    )
    print(
        f"  events received={len(bench.rec.events)} finals={sum(map(len, all_finals.values()))}"
        f" calls with a final={len(all_finals)} bad signatures={unsigned}"
    )
    print(f"  reproduce: {shlex.join([py, script, *sys.argv[1:]])}")
    if in_steps:
        print(f"  inbound SIPp (last step): {shlex.join(in_steps[-1]['cmd'])}")
    print(f"  (run in {work}: removed after a clean run unless --keep)")
    for b in bad:
        print(f"  FAILED: {b}", file=sys.stderr)
    if bad:
        print(f"  see {work} (gateway.log, sipp-in-*/)", file=sys.stderr)
    elif not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100, help="sequential setup calls (100)")
    ap.add_argument("--warmup", type=int, default=3, help="calls made first, not counted (3)")
    ap.add_argument("--pause-ms", type=int, default=50, help="between setup calls (50)")
    ap.add_argument("--workers", type=int, default=16, help="node workers, 4 call slots each (16)")
    ap.add_argument(
        "--rates",
        default="10,20,30,40,45,50,55,60,65,70",
        help="calls/s steps (10,20,30,40,45,50,55,60,65,70)",
    )
    ap.add_argument("--step-s", type=float, default=3.0, help="seconds per rate step (3)")
    ap.add_argument(
        "--hold-ms",
        type=int,
        default=0,
        help="rate steps: the carrier hangs up this long after ACK; 0 (default): "
        "the document's hangup ends each call",
    )
    ap.add_argument("--no-setup", action="store_true", help="skip the setup phase")
    ap.add_argument("--no-rates", action="store_true", help="skip the rate phases")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.no_rates and not shutil.which("sipp"):
        sys.exit("sipp not found (Debian package sip-tester)")
    work = Path(tempfile.mkdtemp(prefix="sautikit-outbound-"))
    print(f"bench/outbound.py: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, work dir {work}")
    return asyncio.run(run(args, work))


if __name__ == "__main__":
    raise SystemExit(main())
