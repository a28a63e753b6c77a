#!/usr/bin/env python3
"""`stream` on one node, measured on the audio itself (all on 127.0.0.1, all real).

Parts:
  * the node: `python -m gateway.cli run` (managed Kamailio front, ceil(N/4) workers of 4
    calls); its voice app (this process) answers every call with
    {"actions": [{"stream": {"url": <agent>, "connect": true}}, {"hangup": {}}]};
  * the agent: tests/integration/ws_agent.WsAgent in this process (aiohttp, audio.drachtio.org);
  * callers: SIPp (PCMA) playing a pcap written here (20 ms packets);
  * the wire: an AF_PACKET capture of the RTP on `lo` in a child process (kernel time stamps,
    a BPF filter passing incoming UDP only; its kernel drop count is reported), so the RTP
    times and the agent's frame times are on one clock (CLOCK_REALTIME).

1. Latency (one call at a time, --latency-calls of them): SIPp plays speech (g711a.pcap's);
   the agent stores every frame with its arrival time. Caller audio -> WebSocket frame: each
   RTP packet into the gateway is found in the frames by cross-correlation (per 0.5 s block;
   the jitter buffer may slip), latency = arrival of the frame holding the packet's last
   sample - the packet's capture time. WebSocket frame -> caller's RTP: the agent sends
   speech as 20 ms binary frames paced at real time (send times kept), found the same way in
   the RTP the gateway sends the caller: capture time of the packet holding the frame's last
   sample - the frame's send time. killAudio -> silence: --kills times per call, 1.5 s of tone
   sent at once, killAudio 0.4-0.7 s into its playout; the first RTP packet to the caller
   after the kill that is silence: its capture time - the kill's send time.
2. Concurrency sweep (--levels): N SIPp calls at once (`-l N -m N`), each playing a tone and
   holding --hold-s; each stream's agent side sends a tone back, paced at real time in 20 ms
   frames after a 100 ms head start (as a TTS stream would), and takes the caller's frames.
   In the window when all N are up: gaps at the agent (frames missing against 50/s, or an
   inter-arrival over 80 ms), holes in the caller-side audio (a silent RTP packet to a caller,
   a lost sequence number, or an inter-packet time over 60 ms), CPU of the node's process tree
   (psutil) per stream-second, machine CPU. The sweep stops at the first level with gaps.
   IVR capacity for comparison: the latest bench/results/capacity-*.md (same machine).

usage: PYTHONPATH=. .venv/bin/python bench/streams.py [--quick] [--levels 4,8,16,24,32,40]
           [--hold-s 20] [--kills 30] [--latency-calls 2] [--out bench/results/streams-DATE.md]
Needs root (AF_PACKET, SIPp's pcap play), sipp, kamailio. --quick: one latency call (12 kills),
levels 4 and 8 with 10 s holds, about 1.5 min.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import math
import os
import pickle
import random
import re
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import capacity_proc as proc  # noqa: E402
from capacity import free_block, start_gateway, stop_gateway  # noqa: E402

from gateway.demo import free_port  # noqa: E402
from tests import tones  # noqa: E402
from tests.integration.pcap_audio import (  # noqa: E402
    RATE,
    align,
    align_blocks,
    g711_decode,
    pcap_audio,
    write_rtp_pcap,
)
from tests.integration.ws_agent import AgentSession, WsAgent, from_l16, l16  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NUMBER = "+254700000001"
G711A = Path("/usr/share/sip-tester/g711a.pcap")
FRAME = 160
RTP_PER_WORKER = 12
LEAD_FRAMES = 10  # the agent's head start: 200 ms (TTS streams run ahead of real time)
T0 = time.monotonic()

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="stream bench caller">
  <send retrans="500"><![CDATA[
INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: "Caller" <sip:+254722[call_number]@[local_ip]:[local_port]>;tag=[pid]S[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: sip:caller@[local_ip]:[local_port]
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=caller 1 1 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[local_ip_type] [local_ip]
t=0 0
m=audio [auto_media_port] RTP/AVP 8
a=rtpmap:8 PCMA/8000
a=ptime:20
a=sendrecv
]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true" rrs="true"/>
  <send><![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: "Caller" <sip:+254722[call_number]@[local_ip]:[local_port]>;tag=[pid]S[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
[routes]
Max-Forwards: 70
Content-Length: 0
]]></send>
  <pause milliseconds="200"/>
  <nop><action><exec play_pcap_audio="@PCAP@"/></action></nop>
@TAIL@
</scenario>
"""
WAIT_BYE = """  <recv request="BYE" timeout="@TIMEOUT@"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0
]]></send>"""
SEND_BYE = """  <pause milliseconds="@HOLD@"/>
  <send retrans="500"><![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: "Caller" <sip:+254722[call_number]@[local_ip]:[local_port]>;tag=[pid]S[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 2 BYE
[routes]
Max-Forwards: 70
Content-Length: 0
]]></send>
  <recv response="200" timeout="10000"/>"""


def since() -> str:
    return f"[{time.monotonic() - T0:6.1f}s]"


def say(text: str) -> None:
    print(f"{since()} {text}", flush=True)


def pct(xs: Any, p: float) -> float:
    a = np.asarray(xs, dtype=np.float64)
    return float(np.percentile(a, p)) if a.size else math.nan


# -- the wire: AF_PACKET capture in a child process -----------------------------------------
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
SOL_PACKET = 263
PACKET_STATISTICS = 6


def _bpf_incoming_udp() -> list[tuple[int, int, int, int]]:
    return [
        (0x20, 0, 0, 0xFFFFF004),  # ld pkttype
        (0x15, 5, 0, 4),  # PACKET_OUTGOING (lo shows each packet twice): drop
        (0x28, 0, 0, 12),  # ldh ethertype
        (0x15, 0, 3, 0x0800),  # IPv4 or drop
        (0x30, 0, 0, 23),  # ldb protocol
        (0x15, 0, 1, 17),  # UDP or drop
        (0x06, 0, 0, 0xFFFF),
        (0x06, 0, 0, 0),
    ]


def sniff_main(out: str, lo: int, hi: int) -> None:
    """Child process: RTP packets with one end in [lo, hi) until SIGTERM; pickled to `out`:
    {"packets": [(t, sport, dport, seq, ts, ssrc, payload)], "kernel": (packets, drops)}."""
    sk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    prog = _bpf_incoming_udp()
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    sk.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                  struct.pack("HL", len(prog), ctypes.addressof(buf)))
    sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sk.bind(("lo", 0))
    sk.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sk.settimeout(0.2)
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    packets: list[tuple[float, int, int, int, int, int, bytes]] = []
    unpack = struct.unpack_from
    while not stop:
        try:
            pkt, anc, _, _ = sk.recvmsg(2048, socket.CMSG_SPACE(16))
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        u = 14 + (pkt[14] & 15) * 4
        sport, dport = unpack("!HH", pkt, u)
        if not (lo <= sport < hi or lo <= dport < hi):
            continue
        b = u + 8
        if len(pkt) < b + 12 + 80 or pkt[b] >> 6 != 2 or 200 <= pkt[b + 1] <= 204:
            continue
        t = time.time()
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack("qq", data[:16])
                t = sec + nsec / 1e9
        seq, ts, ssrc = unpack("!HII", pkt, b + 2)
        packets.append((t, sport, dport, seq, ts, ssrc, bytes(pkt[b + 12:])))
    st = sk.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    with open(out, "wb") as f:
        pickle.dump({"packets": packets, "kernel": struct.unpack("II", st)}, f)


class Sniffer:
    def __init__(self, work: Path, ports: range) -> None:
        self.out = work / f"sniff-{secrets.token_hex(3)}.pickle"
        self.ports = ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.kernel = (0, 0)

    async def start(self) -> None:
        me = str(Path(__file__).resolve())  # noqa: ASYNC240
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (started once, returns at once)
            [sys.executable, me, "--sniff", str(self.out),
             str(self.ports.start), str(self.ports.stop)], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError("the sniffer did not start (root needed for AF_PACKET)")

    async def stop(self) -> list[tuple[float, int, int, int, int, int, bytes]]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, 30)
        data = pickle.loads(await asyncio.to_thread(self.out.read_bytes))
        self.out.unlink()
        self.kernel = tuple(data["kernel"])  # type: ignore[assignment]
        return list(data["packets"])


# -- the node, its voice app, the agent --------------------------------------------------------
@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    sip_port: int
    rtp: range
    tree: proc.Node
    workers: int
    work: Path


class VoiceApp:
    def __init__(self) -> None:
        self.secret = secrets.token_hex(8)
        self.agent_url = ""
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def voice(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        return web.json_response({"actions": [
            {"stream": {"url": self.agent_url, "connect": True}}, {"hangup": {}}]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/voice", self.voice)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def node_config(work: Path, app: VoiceApp, workers: int, rtp_start: int) -> tuple[Path, int]:
    sip_port, api_port = free_port(both=True), free_port()
    worker_port = free_block(25000, workers, 25500, tcp=True)
    path = work / "gateway.toml"
    path.write_text(f"""
[sip]
listen = "127.0.0.1:{sip_port}"
[api]
listen = "127.0.0.1:{api_port}"
token = "{secrets.token_hex(16)}"
[callbacks]
timeout_s = 10
allow_http = true
allow_private = true
[storage]
dir = "{work / "var"}"
[media]
rtp_port_start = {rtp_start}
rtp_ports_per_worker = {RTP_PER_WORKER}
[workers]
count = {workers}
calls_per_worker = 4
reserved_slots = 0
host = "127.0.0.1"
sip_port_start = {worker_port}
[kamailio]
mode = "managed"
flood_limit = 0
[log]
level = "WARNING"

[[numbers]]
e164 = "{NUMBER}"
number_id = "num_streams"
workspace_id = "ws_streams"
voice_callback_url = "http://127.0.0.1:{app.port}/voice"
webhook_secret = "{app.secret}"
""")
    return path, sip_port


async def start_node(work: Path, app: VoiceApp, streams: int) -> Node:
    workers = max(1, math.ceil(streams / 4))
    rtp_start = free_block(30000, workers * RTP_PER_WORKER + 48, 32768)
    config, sip_port = node_config(work, app, workers, rtp_start)
    api = "http://127.0.0.1:" + re.findall(r'\[api\]\nlisten = "127.0.0.1:(\d+)"',
                                           config.read_text())[0]
    started = await asyncio.to_thread(start_gateway, config, work / "gateway.log", api,
                                      30 + 1.5 * workers)
    tree = proc.Node({started.proc.pid}, proc.pids_mentioning(str(work)))
    await asyncio.sleep(2.0)  # the front's first OPTIONS probes of every worker
    return Node(started.proc, sip_port,
                range(rtp_start, rtp_start + workers * RTP_PER_WORKER + 48), tree, workers, work)


async def run_sipp(node: Node, scenario: Path, calls: int, rate: float, timeout: float,
                   work: Path) -> tuple[int, str, list[str]]:
    cmd = ["sipp", "-sf", str(scenario), f"127.0.0.1:{node.sip_port}", "-s", NUMBER,
           "-m", str(calls), "-l", str(calls), "-r", f"{rate:g}", "-i", "127.0.0.1",
           "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port(socket.SOCK_DGRAM)),
           "-timeout", str(int(timeout)), "-timeout_error", "-nostdin", "-trace_err"]
    p = await asyncio.create_subprocess_exec(*cmd, cwd=work, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(p.communicate(), timeout + 30)
    return p.returncode or 0, out.decode(errors="replace")[-3000:], cmd


def sipp_ok(out: str) -> int:
    rows = [ln for ln in out.splitlines() if ln.strip().startswith("Successful call")]
    return int(rows[-1].split("|")[-1].split()[0]) if rows else -1


def scenario(work: Path, name: str, pcap: Path, tail: str) -> Path:
    path = work / f"{name}.xml"
    path.write_text(SCENARIO.replace("@PCAP@", str(pcap)).replace("@TAIL@", tail))
    return path


# -- analysis -----------------------------------------------------------------------------------
def streams_of(packets: list[Any], node: Node) -> tuple[dict[int, list[Any]], dict[int, list[Any]]]:
    """(into the node by source port, out of the node by destination port), each in capture
    order."""
    into: dict[int, list[Any]] = {}
    out: dict[int, list[Any]] = {}
    for p in packets:
        _t, sport, dport = p[0], p[1], p[2]
        if dport in node.rtp and sport not in node.rtp:
            into.setdefault(sport, []).append(p)
        elif sport in node.rtp and dport not in node.rtp:
            out.setdefault(dport, []).append(p)
    return into, out


def latencies(x_sent: Any, t_sent: Any, y_got: Any, t_got: Any) -> tuple[list[float], float]:
    """Per 20 ms frame of `x_sent` (sent at t_sent[i]), where it shows up in `y_got` (each
    20 ms frame j of it seen at t_got[j]): the latency of the frame's last sample. Only frames
    with sound count (silence matches anything). (latencies, correlation)."""
    lag, coeff = align(y_got, x_sent)
    blocks = align_blocks(y_got, x_sent, lag)
    out: list[float] = []
    n = min(len(t_sent), x_sent.size // FRAME)
    for i in range(n):
        seg = x_sent[i * FRAME:(i + 1) * FRAME]
        if float(np.sqrt(np.mean(seg * seg))) < 0.01:
            continue
        b = next((blk for blk in blocks if blk.start <= i * FRAME < blk.end), None)
        if b is None or not (b.coeff == b.coeff) or b.coeff < 0.95:  # a copy: ~1.0
            continue
        j = (i * FRAME + FRAME - 1 + b.lag) // FRAME
        if 0 <= j < len(t_got):
            out.append(t_got[j] - t_sent[i])
    return out, coeff


def decode_stream(pkts: list[Any]) -> tuple[Any, Any]:
    """A stream's PCMA audio in sequence order (dupes dropped) and each packet's capture time."""
    seen: dict[int, Any] = {}
    base = pkts[0][3]
    ext = 0
    prev = base
    for p in pkts:
        d = (p[3] - prev) % 65536
        ext += d - 65536 if d >= 32768 else d
        prev = p[3]
        seen.setdefault(ext, p)
    order = [seen[k] for k in sorted(seen)]
    x = np.concatenate([g711_decode(p[6], "PCMA") for p in order]).astype(np.float64)
    return x, np.array([p[0] for p in order])


SILENT = 0.002


def silent_payload(payload: bytes) -> bool:
    return bool(np.abs(g711_decode(payload, "PCMA")).max() < SILENT)


@dataclass
class LatencyRun:
    uplink_ms: list[float] = field(default_factory=list)
    downlink_ms: list[float] = field(default_factory=list)
    kill_ms: list[float] = field(default_factory=list)
    resumed_after_kill: int = 0
    corr: list[float] = field(default_factory=list)
    kernel: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


async def latency_phase(args: argparse.Namespace, base: Path, app: VoiceApp, agent: WsAgent
                        ) -> LatencyRun:
    work = base / "latency"
    work.mkdir()
    res = LatencyRun()
    up = pcap_audio(G711A).astype(np.float64)[int(0.5 * RATE):]  # 6.5 s of speech
    pcap = work / "speech.pcap"
    write_rtp_pcap(pcap, up, law="PCMA")
    down = pcap_audio(G711A).astype(np.float64)[int(0.6 * RATE):int(4.6 * RATE)]
    down_pcm = l16(down)
    kills = args.kills
    sc = scenario(work, "latency", pcap, WAIT_BYE.replace("@TIMEOUT@", "120000"))
    node = await start_node(work, app, 1)
    timeline: dict[str, Any] = {}
    try:
        async def script(s: AgentSession) -> None:
            await s.wait_preamble()
            await asyncio.sleep(0.5)
            # downlink: speech paced at real time, 20 ms frames, send times kept
            sends: list[float] = []
            t0 = time.monotonic()
            for i in range(0, len(down_pcm), 2 * FRAME):
                delay = t0 + (i // (2 * FRAME)) * 0.02 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sends.append(time.time())
                await s.ws.send_bytes(down_pcm[i:i + 2 * FRAME])
            timeline["down_sends"] = sends
            await asyncio.sleep(0.5)
            kill_at: list[float] = []
            tone = l16(tones.sine(941, 1.5, RATE))
            for _ in range(kills):
                await s.ws.send_bytes(tone)
                await asyncio.sleep(random.uniform(0.4, 0.7))
                kill_at.append(time.time())
                await s.kill_audio()
                await asyncio.sleep(0.3)
            timeline["kills"] = kill_at
            await s.close(1000)

        agent.script = script
        for n in range(args.latency_calls):
            sniffer = Sniffer(work, node.rtp)
            await sniffer.start()
            before = len(agent.sessions)
            code, out, cmd = await run_sipp(node, sc, 1, 1, 60 + kills, work)
            packets = await sniffer.stop()
            res.kernel = (res.kernel[0] + sniffer.kernel[0], res.kernel[1] + sniffer.kernel[1])
            if sipp_ok(out) != 1 or len(agent.sessions) <= before:
                res.notes.append(f"latency call {n}: SIPp exit {code}, sessions "
                                 f"{len(agent.sessions) - before}: {out[-600:]}")
                continue
            s = agent.sessions[before]
            into, outs = streams_of(packets, node)
            if not into or not outs:
                res.notes.append(f"latency call {n}: no RTP seen (into {len(into)}, "
                                 f"out {len(outs)})")
                continue
            x_in, t_in = decode_stream(max(into.values(), key=len))
            ws = from_l16(s.pcm())
            t_ws = np.array([f.wall for f in s.frames])
            np.savez(work / f"uplink-{n}.npz", x_in=x_in, t_in=t_in, ws=ws, t_ws=t_ws)
            lat, c = latencies(x_in, t_in, ws, t_ws)
            res.uplink_ms += [v * 1e3 for v in lat]
            res.corr.append(c)
            opk = max(outs.values(), key=len)
            y_out, t_out = decode_stream(opk)
            lat, c = latencies(down, np.array(timeline["down_sends"]), y_out, t_out)
            res.downlink_ms += [v * 1e3 for v in lat]
            res.corr.append(c)
            silent = [(p[0], silent_payload(p[6])) for p in opk]
            for k in timeline["kills"]:
                after = [(t, q) for t, q in silent if t >= k]
                first = next((t for t, q in after if q), None)
                if first is None:
                    res.notes.append("a kill never went silent")
                    continue
                res.kill_ms.append((first - k) * 1e3)
                # the killed tone must not come back before the next burst (0.3 s later)
                res.resumed_after_kill += sum(1 for t, q in after if first < t < k + 0.28
                                              and not q)
            say(f"latency call {n}: uplink {len(res.uplink_ms)} frames, downlink "
                f"{len(res.downlink_ms)}, kills {len(res.kill_ms)}; correlation "
                f"{[round(v, 3) for v in res.corr]}; {' '.join(shlex.quote(a) for a in cmd)}")
    finally:
        await asyncio.to_thread(stop_gateway, node.proc)
    return res


@dataclass
class Level:
    n: int
    workers: int = 0
    sessions: int = 0
    sipp_ok: int = 0
    window_s: float = 0.0
    agent_missing: int = 0
    agent_late: int = 0
    caller_silent: int = 0
    caller_lost: int = 0
    caller_late: int = 0
    caller_streams: int = 0
    cpu_ms_per_stream_s: float = math.nan
    worker_cpu_ms_per_stream_s: float = math.nan
    caller_max_gap_ms: float = 0.0
    agent_stall_ms: float = 0.0  # the agent's own event loop, longest stall in the window
    agent_late_own: int = 0  # agent-side late frames during its own loop's stalls (not counted)
    caller_silent_own: int = 0  # caller-side holes right after the agent's stalls (not counted)
    machine_busy_pct: float = math.nan
    kernel_drops: int = 0
    max_gap_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def gaps(self) -> int:
        return (self.agent_missing + self.agent_late + self.caller_silent + self.caller_lost
                + self.caller_late)

    @property
    def held(self) -> bool:
        return (self.gaps == 0 and self.sessions == self.n and self.sipp_ok == self.n
                and self.caller_streams == self.n and self.kernel_drops == 0)


async def level_run(args: argparse.Namespace, base: Path, app: VoiceApp, agent: WsAgent,
                    n: int) -> Level:
    work = base / f"level-{n}"
    work.mkdir()
    lv = Level(n)
    hold_ms = int(args.hold_s * 1000)
    pcap = work / "tone.pcap"
    write_rtp_pcap(pcap, tones.sine(697, args.hold_s + 2, RATE, 0.3), law="PCMA")
    sc = scenario(work, "hold", pcap, SEND_BYE.replace("@HOLD@", str(hold_ms)))
    tone = l16(tones.sine(1209, args.hold_s + 10, RATE, 0.3))
    node = await start_node(work, app, n)
    lv.workers = node.workers

    async def script(s: AgentSession) -> None:
        await s.wait_preamble()
        step = 2 * FRAME
        lead = LEAD_FRAMES
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(tone), step)):
            if k >= lead:
                delay = t0 + (k - lead) * 0.02 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            late = time.monotonic() - (t0 + max(0, k - lead) * 0.02)
            lateness.append(late)
            await s.ws.send_bytes(tone[i:i + step])

    lateness: list[float] = []
    agent.script = script
    first = len(agent.sessions)
    sniffer = Sniffer(work, node.rtp)
    await sniffer.start()
    rate = max(5.0, n / 2.0)
    stalls: list[tuple[float, float]] = []  # (wall at the end of a stall, its length)

    async def loop_lag() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.005)
            over = time.monotonic() - t - 0.005
            if over > 0.02:
                stalls.append((time.time(), over))

    lagger = asyncio.ensure_future(loop_lag())
    gc.collect()
    gc.disable()  # no collector pauses in the agent while it paces N streams
    try:
        sipp = asyncio.ensure_future(run_sipp(node, sc, n, rate, args.hold_s + 60, work))
        # the window: from all N streams up (+1 s) to the first BYE (calls last hold_s)
        t_start = time.monotonic()
        while len(agent.sessions) - first < n and time.monotonic() - t_start < 30:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        w0, wall0 = time.monotonic(), time.time()
        c0, m0, k0 = await asyncio.to_thread(cpu_snapshot, node)
        up_s = time.monotonic() - t_start
        end = t_start + args.hold_s - 0.8  # the first call's BYE comes hold_s after its start
        await asyncio.sleep(max(1.0, end - time.monotonic()))
        c1, m1, k1 = await asyncio.to_thread(cpu_snapshot, node)
        w1, wall1 = time.monotonic(), time.time()
        code, out, cmd = await sipp
        lv.sipp_ok = sipp_ok(out)
        if lv.sipp_ok != n:
            lv.notes.append(f"SIPp exit {code}, {lv.sipp_ok} ok: {out[-500:]}")
    finally:
        gc.enable()
        lagger.cancel()
        packets = await sniffer.stop()
        await asyncio.to_thread(stop_gateway, node.proc)
    lv.kernel_drops = sniffer.kernel[1]
    if lateness:
        lv.notes.append(f"agent sends: lateness p50 {pct(lateness, 50) * 1e3:.1f} ms, p99 "
                        f"{pct(lateness, 99) * 1e3:.1f} ms, max {max(lateness) * 1e3:.1f} ms")
    lv.window_s = w1 - w0
    lv.machine_busy_pct = proc.busy_pct(m0, m1)
    sessions = agent.sessions[first:]
    lv.sessions = len(sessions)
    lv.cpu_ms_per_stream_s = (c1 - c0) * 1e3 / max(1, lv.sessions) / lv.window_s
    lv.worker_cpu_ms_per_stream_s = (k1 - k0) * 1e3 / max(1, lv.sessions) / lv.window_s
    win_stalls = [(e, d) for e, d in stalls if wall0 <= e <= wall1 + 0.5]
    lv.agent_stall_ms = max((d for _, d in win_stalls), default=0.0) * 1e3

    def own_stall(at: float) -> bool:  # a late arrival the agent's own loop explains
        return any(e - d - 0.03 <= at <= e + 0.03 for e, d in win_stalls)

    for s in sessions:
        t = np.array([f.wall for f in s.frames if wall0 <= f.wall <= wall1])
        if t.size < 2:
            lv.agent_missing += int(lv.window_s / 0.02)
            continue
        d = np.diff(t)
        lv.max_gap_ms = max(lv.max_gap_ms, float(d.max()) * 1e3)
        for i in np.flatnonzero(d > 0.08):
            if own_stall(float(t[i + 1])):
                lv.agent_late_own += 1
            else:
                lv.agent_late += 1
        lv.agent_missing += max(0, round((t[-1] - t[0]) / 0.02) + 1 - t.size - 1)
    _, outs = streams_of(packets, node)
    for pk in outs.values():
        inwin = [p for p in pk if wall0 <= p[0] <= wall1]
        if len(inwin) < 10:
            continue
        lv.caller_streams += 1
        seqs = np.array([p[3] for p in inwin], dtype=np.int64)
        ds = np.diff(seqs) % 65536
        lv.caller_lost += int(np.maximum(ds - 1, 0)[ds < 1000].sum())
        tt = np.diff(np.array([p[0] for p in inwin]))
        lv.caller_late += int((tt > 0.06).sum())
        lv.caller_max_gap_ms = max(lv.caller_max_gap_ms, float(tt.max()) * 1e3)
        holes = [p[0] for p in inwin if silent_payload(p[6])]
        own = [h for h in holes if any(e - d <= h <= e + LEAD_FRAMES * 0.02 + 0.1
                                       for e, d in win_stalls)]
        lv.caller_silent_own += len(own)
        lv.caller_silent += len(holes) - len(own)
        if holes:
            lv.notes.append(f"caller port {inwin[0][2]}: silent packets at "
                            f"{[round(h - wall0, 3) for h in holes][:12]} s into the window "
                            f"(stream's first packet {pk[0][0] - wall0:.2f} s)")
    say(f"level {n}: {lv.sessions} streams up in {up_s:.1f}s, window {lv.window_s:.1f}s, gaps "
        f"{lv.gaps} (agent missing {lv.agent_missing} late {lv.agent_late}; caller silent "
        f"{lv.caller_silent} lost {lv.caller_lost} late {lv.caller_late}; {lv.caller_streams} "
        f"caller streams; max gaps agent {lv.max_gap_ms:.0f} ms, caller "
        f"{lv.caller_max_gap_ms:.0f} ms; agent loop stall {lv.agent_stall_ms:.0f} ms, "
        f"{lv.agent_late_own} late frames and {lv.caller_silent_own} caller holes in its "
        f"stalls), CPU {lv.cpu_ms_per_stream_s:.2f} "
        f"(workers {lv.worker_cpu_ms_per_stream_s:.2f}) ms per stream-second, machine "
        f"{lv.machine_busy_pct:.0f}% busy, capture drops {lv.kernel_drops}; "
        f"{' '.join(shlex.quote(a) for a in cmd)}")
    return lv


def cpu_snapshot(node: Node) -> tuple[float, tuple[float, float], float]:
    """(node tree CPU s, machine CPU, workers' CPU s): psutil, off the agent's loop."""
    return (node.tree.cpu(), proc.machine_cpu(),
            sum(proc.cpu_s(p) for p in node.tree.workers()))


def ivr_capacity() -> tuple[str, str]:
    """(figure, source) from the newest bench/results/capacity-*.md."""
    files = sorted(RESULTS.glob("capacity-20*.md"))
    files = [f for f in files if "sustain" not in f.name]
    if not files:
        return "not measured", ""
    text = files[-1].read_text()
    m = re.search(r"\*\*Capacity: (\d+) concurrent calls", text)
    if not m:
        return "not found", files[-1].name
    cap = m.group(1)
    row = re.search(rf"^\| {cap} / \d+ \|.*$", text, re.M)
    cpu = ""
    if row:
        cells = [c.strip() for c in row.group(0).strip("|").split("|")]
        if len(cells) > 6:
            cpu = f", {cells[6].split(' ')[0]} ms CPU per call-second"
    return f"{cap} concurrent IVR calls{cpu}", files[-1].name


def fmt(xs: list[float]) -> str:
    if not xs:
        return "not measured"
    return (f"p50 {pct(xs, 50):.1f} / p99 {pct(xs, 99):.1f} ms (n {len(xs)}, min "
            f"{min(xs):.1f}, max {max(xs):.1f})")


def report(args: argparse.Namespace, lat: LatencyRun | None, levels: list[Level],
           elapsed: float, command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0]
    lines = [f"# Streams (`stream` on one node), {datetime.now():%Y-%m-%d %H:%M}", "",
             f"Commit {commit}, {psutil.cpu_count()} cores, Python {sys.version.split()[0]}, "
             f"load average {load:.2f} at the end; run {elapsed / 60:.1f} min.",
             f"Command: `{command}`", ""]
    if lat is not None:
        goal = lambda xs: ("**met**" if xs and pct(xs, 99) < 40  # noqa: E731
                           else ("p50 met, p99 not" if xs and pct(xs, 50) < 40 else "not met"))
        lines += ["## Latency on the audio (one call at a time; RTP capture on lo and the "
                  "agent's frame times on one clock)", "",
                  "| path | figure | goal < 40 ms |", "|---|---|---|",
                  f"| caller RTP in -> WebSocket frame at the agent | {fmt(lat.uplink_ms)} | "
                  f"{goal(lat.uplink_ms)} |",
                  f"| agent's WebSocket frame -> RTP to the caller | {fmt(lat.downlink_ms)} | "
                  f"{goal(lat.downlink_ms)} |",
                  f"| killAudio -> first silent RTP packet to the caller | {fmt(lat.kill_ms)} | "
                  f"{goal(lat.kill_ms)} |", "",
                  f"Killed audio heard again after the silence: {lat.resumed_after_kill} "
                  f"packets. Whole-stream single-lag correlations (uplink, downlink per call; "
                  f"each 0.5 s block is aligned on its own and only blocks matching >= 0.95 count) "
                  f"{[round(c, 3) for c in lat.corr]}. "
                  f"Capture: {lat.kernel[0]} packets, {lat.kernel[1]} dropped by the kernel."]
        lines += [f"- {n}" for n in lat.notes]
        lines.append("")
    ivr, src = ivr_capacity()
    if levels:
        held = [lv for lv in levels if lv.held]
        best = max((lv.n for lv in held), default=0)
        lines += ["## Concurrent bidirectional streams (connect: true, caller tone in, agent "
                  "tone out paced at real time)", "",
                  "| streams | workers | up / SIPp ok | window s | gaps (agent missing/late; "
                  "caller silent/lost/late) | max gap ms: agent / caller RTP | agent's own loop "
                  "stall ms (late frames / caller holes it explains, not counted) | CPU ms per "
                  "stream-second: node (workers) | machine busy % | capture drops |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for lv in levels:
            lines.append(
                f"| {lv.n} | {lv.workers} | {lv.sessions} / {lv.sipp_ok} | {lv.window_s:.1f} "
                f"| {lv.gaps} ({lv.agent_missing}/{lv.agent_late}; {lv.caller_silent}/"
                f"{lv.caller_lost}/{lv.caller_late}) | {lv.max_gap_ms:.0f} / "
                f"{lv.caller_max_gap_ms:.0f} | {lv.agent_stall_ms:.0f} ({lv.agent_late_own} / "
                f"{lv.caller_silent_own}) | "
                f"{lv.cpu_ms_per_stream_s:.2f} ({lv.worker_cpu_ms_per_stream_s:.2f}) | "
                f"{lv.machine_busy_pct:.0f} | "
                f"{lv.kernel_drops} |")
        lines += ["", f"**Held with 0 gaps: {best} concurrent bidirectional streams**"
                  + (" (every level run held: a lower bound)" if held and len(held) ==
                     len(levels) else "") + f". Same node, IVR: {ivr} ({src}).", ""]
        for lv in levels:
            lines += [f"- level {lv.n}: {n}" for n in lv.notes]
    return "\n".join(lines) + "\n"


async def amain(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    app = VoiceApp()
    await app.start()
    agent = await WsAgent(secret=app.secret).start()
    app.agent_url = agent.url("/bench")
    lat: LatencyRun | None = None
    levels: list[Level] = []
    t0 = time.monotonic()
    try:
        if not args.no_latency:
            say("latency: one call at a time")
            lat = await latency_phase(args, base, app, agent)
            agent.sessions.clear()
        for n in args.levels:
            lv = await level_run(args, base, app, agent, n)
            agent.sessions.clear()
            levels.append(lv)
            if not lv.held:
                break
    finally:
        await agent.stop()
        await app.stop()
    command = "PYTHONPATH=. .venv/bin/python bench/streams.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    text = report(args, lat, levels, time.monotonic() - t0, command)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)  # noqa: ASYNC240
        print(f"written {args.out}")
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--sniff":
        sniff_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--levels", default="4,8,16,24,32,40")
    ap.add_argument("--hold-s", type=float, default=20.0)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--latency-calls", type=int, default=2)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.levels = [int(v) for v in str(args.levels).split(",") if v]
    if args.quick:
        args.kills, args.latency_calls, args.hold_s = 12, 1, 10.0
        if "--levels" not in sys.argv:
            args.levels = [4, 8]
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
