#!/usr/bin/env python3
"""Bridged calls (dial pairs) one node holds on this machine with 0 failures, as a ratio to a
bare pjsua2 bridge ceiling measured in the same run.

Both sides get the same traffic, all on 127.0.0.1, all real:
  * the caller's carrier: SIPp (bench/bridge_ceiling/carrier.xml) calls +254700000001 through
    the front, `-l P -m 2P`: INVITE (PCMA/PCMU/telephone-event), 200, ACK, the caller talks
    (g711a.pcap) and hangs up about 9 s after the ACK (`--hangup callee`: the callee hangs up
    instead, and the carrier waits for the bridge's BYE: carrier_waits.xml);
  * the callee's carrier: a second SIPp as UAS (callee.xml / callee_hangs_up.xml): INVITE,
    180, 300 ms of ringing, 200 with PCMA, ACK, the callee talks (g711a.pcap) and gets the
    bridge's BYE (or sends its own).
The bare ceiling (bench/bridge_ceiling/): ceil(P/2) bare_bridge_worker.py processes (4 calls
each = 2 bridged pairs: answer, dial the callee through the front, startTransmit both ways,
either side's BYE ends both) behind Kamailio (kamailio.cfg.tmpl: round robin + failover for
inbound, the callee's number routed to the callee SIPp, record-route both ways).
The node: `python -m gateway.cli run --config FILE` (managed Kamailio front, ceil(P/2) workers
of calls_per_worker 4 with `reserved_slots` 2, so two inbound calls per worker and a slot for
each one's dial leg; `[[trunks]]` to the callee SIPp; `[control_plane] events_url` at this
process's events receiver), whose voice app (this process) answers every call with
{"actions":[{"dial":{"number":"+254711000001","timeout":10}}]} (and the callback after the
dial, the one with DialCallStatus, with a hangup).

A pair counts as failed if the carrier's SIPp failed its call (or the INVITE was refused), or
the callee's SIPp failed or never got its call; on the node also if any leg (the caller's or
the dial's child, `parent_call_id`) did not get exactly one final event (call.completed or
call.failed) at the events receiver. Each side is swept over --pairs (stop at the first level
with a failure, then bisect the gap once), a fresh ceiling / node per level.

Figures per level: pairs held (peak concurrent from the carrier's trace), INVITE -> 200 at the
carrier, carrier INVITE -> callee INVITE (the dial reaching the callee; legs paired by
Call-ID where known, else by time) and the callee's 200 -> ACK (its answer taken), CPU of the
system under test (the node's process tree with its Kamailio, or the bare workers + Kamailio;
psutil) per bridged pair-second (callee ACK -> BYE summed), machine CPU and the part of it
that is not ours, worker threads, final events per leg. Levels of at most 4 pairs also read
the RTP on lo (bridges_trace.AudioSniffer): speech must reach each side while bridged, and
the one-way delay through the bridge is measured on the audio itself.

Each side starts with one probe pair (the one-way delay); on the node it is also a gate: if
the callee's SIPp got no INVITE or the pair failed, dial does not work on this tree yet and the
node part is reported not measured, with what the node did instead (--no-gate: go on).
--cross-worker: node workers of one call slot, so every bridge spans two workers.

usage: .venv/bin/python bench/bridges.py [--quick] [--pairs 25,50,100,150,200,250]
           [--bare-only | --node-only] [--hangup caller|callee] [--cross-worker] [--cps R]
           [--budget-min 14] [--keep]
Needs root (SIPp's pcap play, the AF_PACKET capture), sipp, kamailio. --quick: bare probe, 4
and 10 pairs, node probe + 4 pairs, about 1.5 min. The full run stays under about 15 min.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import capacity_proc as proc  # noqa: E402
from bridges_trace import (  # noqa: E402
    AudioSniffer,
    failure_kinds,
    fmt_summary,
    match_legs,
    peak_concurrency,
    read_stat,
    read_trace,
    stat_int,
    summary,
)
from capacity import free_block, start_gateway, stop_gateway  # noqa: E402

from gateway.demo import free_port  # noqa: E402
from gateway.events.signing import verify  # noqa: E402

HERE = ROOT / "bench" / "bridge_ceiling"
RESULTS = ROOT / "bench" / "results"
NUMBER = "+254700000001"  # what the carrier calls
CALLEE = "+254711000001"  # what the bridge dials
DIAL: dict[str, Any] = {"actions": [{"dial": {"number": CALLEE, "timeout": 10}}]}
HANGUP: dict[str, Any] = {"actions": [{"hangup": {}}]}
FINAL = ("call.completed", "call.failed")
PAIRS_PER_WORKER = 2  # 4 calls per pjsua2 process
RTP_PER_WORKER = 12
# pjsua hands out RTP ports up to start + portRange inclusive (seen: a bare worker's seventh
# transport on the first port after its block): the audio check looks that far beyond.
RTP_SLACK = 48
CALL_S = 9.5  # INVITE -> BYE of one pair at the default talk time
BISECT_MIN_GAP = 10
LOWER_BOUND = "; every level held: a lower bound, not the limit (higher --pairs to find it)."
AUDIO_CHECK_PAIRS = 4  # levels this small (and the probe) check the audio on the wire
LOUD_SHARE = 0.3  # of the packets each way while bridged (the pcaps give about 0.8)
TREE = {
    "node": "node process tree incl. its Kamailio",
    "bare": "bare workers + Kamailio",
}  # bisect only gaps wider than this many pairs
T0 = time.monotonic()


def since_start() -> str:
    m, s = divmod(int(time.monotonic() - T0), 60)
    return f"[+{m}:{s:02d}]"


def say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------ figures


@dataclass
class Level:
    side: str  # bare | node
    pairs: int
    kind: str = "sweep"  # sweep | bisect | probe
    workers: int = 0
    rate: float = 0.0
    attempted: int = 0  # carrier calls placed
    ok: int = 0
    failed: int = 0
    carrier_ok: int = 0
    carrier_failed: int = 0
    callee_ok: int = 0
    callee_failed: int = 0
    callee_invites: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # carrier's INVITE final codes
    peak_pairs: int = 0
    setup: dict[str, dict[str, float]] = field(default_factory=dict)
    pair_s: float = 0.0  # bridged pair-seconds: callee ACK -> BYE, summed
    pair_s_p50: float = math.nan
    sut_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0  # this process: the node's voice app and events receiver
    sipp_cpu_s: float = 0.0
    others_pct: float = math.nan  # machine busy that is none of ours (other work on the box)
    cpu_ms_per_pair_s: float = math.nan
    machine_busy_pct: float = math.nan
    threads: dict[str, float] = field(default_factory=dict)  # % of the machine
    finals: dict[str, int] = field(default_factory=dict)  # node: legs by final event count
    app: dict[str, int] = field(default_factory=dict)  # node: voice app requests by kind
    events: dict[str, int] = field(default_factory=dict)
    bare_counts: dict[str, int] = field(default_factory=dict)
    legs_matched_exactly: int = 0  # callee legs paired with their caller by Call-ID
    audio: dict[str, Any] = field(default_factory=dict)  # loud packets each way while bridged
    reasons: list[str] = field(default_factory=list)
    ready_s: float = math.nan
    wall_s: float = 0.0
    work: str = ""
    carrier_cmd: list[str] = field(default_factory=list)


@dataclass
class Sitting:
    started: datetime
    argv: list[str]
    commit: str
    load_before: float
    bare: list[Level] = field(default_factory=list)
    node: list[Level] = field(default_factory=list)
    node_broken: str = ""  # why the node part could not run (dial not working, no start)
    wall_s: float = 0.0


def held(levels: list[Level]) -> int:
    """Highest level with 0 failed pairs (probes aside)."""
    return max((r.pairs for r in levels if r.kind != "probe" and r.failed == 0), default=0)


# ------------------------------------------------------------------------ small helpers


def udp_bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        try:
            sk.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def sip_ping(port: int, timeout: float = 0.3) -> bool:
    """An OPTIONS to 127.0.0.1:port answered with anything SIP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        sk.bind(("127.0.0.1", 0))
        me = sk.getsockname()[1]
        tag = secrets.token_hex(4)
        msg = (
            f"OPTIONS sip:ping@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{tag}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:bench@127.0.0.1:{me}>;tag={tag}\r\n"
            f"To: <sip:ping@127.0.0.1:{port}>\r\n"
            f"Call-ID: ping-{tag}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
        sk.settimeout(timeout)
        sk.sendto(msg.encode(), ("127.0.0.1", port))
        try:
            return sk.recv(4096).startswith(b"SIP/2.0 ")
        except OSError:
            return False


async def wait_sip(ports: list[int], timeout: float) -> list[int]:
    """Ports still not answering OPTIONS after `timeout` (empty: all up)."""
    left = list(ports)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        left = [p for p in left if not await asyncio.to_thread(sip_ping, p)]
        if left:
            await asyncio.sleep(0.2)
    return left


def rate_for(pairs: int, args: argparse.Namespace) -> float:
    """SIPp -r: --cps, or fast enough that P concurrent pairs of CALL_S are reached while
    SIPp places its 2P calls."""
    return float(args.cps or max(5, math.ceil(1.5 * pairs / CALL_S)))


def rate_args(rate: float) -> list[str]:
    if rate == int(rate):
        return ["-r", str(int(rate))]
    return ["-r", str(round(rate * 10)), "-rp", "10000"]


async def stop_proc(
    p: asyncio.subprocess.Process | subprocess.Popen[bytes],
    grace: float,
    first: int = signal.SIGTERM,
) -> None:
    """Signal a process we started, by its id; SIGKILL it after `grace` seconds."""
    if isinstance(p, subprocess.Popen):
        if p.poll() is None:
            p.send_signal(first)
            try:
                await asyncio.to_thread(p.wait, grace)
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait)
        return
    if p.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(first)
        try:
            await asyncio.wait_for(p.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


# ------------------------------------------------------------------------ voice app + events


@dataclass
class Leg:
    parent: str | None = None
    direction: str = ""
    events: Counter[str] = field(default_factory=Counter)


class Peer:
    """The voice app (/voice: dial, then hangup after the dial) and the events receiver."""

    def __init__(self) -> None:
        self.app_secret = secrets.token_hex(8)
        self.cp_secret = secrets.token_hex(8)
        self.runner: web.AppRunner | None = None
        self.base = ""
        self.reset()

    def reset(self) -> None:
        self.legs: dict[str, Leg] = {}
        self.app: Counter[str] = Counter()
        self.started: set[str] = set()  # call_ids the voice app was asked to start
        self.events: Counter[str] = Counter()
        self.bad_signatures = 0
        self.changed = asyncio.Event()

    def _ok(self, request: web.Request, raw: bytes, secret: str) -> None:
        try:
            verify(raw, request.headers.get("X-Sautikit-Signature", ""), secret)
        except Exception:
            self.bad_signatures += 1

    async def voice(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self._ok(request, raw, self.app_secret)
        form = dict(urllib.parse.parse_qsl(raw.decode(errors="replace")))
        if "DialCallStatus" in form:
            self.app[f"after dial: DialCallStatus={form['DialCallStatus']}"] += 1
            return web.json_response(HANGUP)
        if form.get("parentCallId"):
            self.app["child leg fetch (unexpected)"] += 1
            return web.json_response(HANGUP)
        self.app["start"] += 1
        self.started.add(form.get("callId", "?"))
        return web.json_response(DIAL)

    async def event(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self._ok(request, raw, self.cp_secret)
        try:
            body = json.loads(raw)
        except ValueError:
            self.events["(not JSON)"] += 1
            return web.Response(status=200)
        kind = body.get("kind", "?")
        data = body.get("data") or {}
        self.events[kind] += 1
        call_id = data.get("call_id")
        if call_id:
            leg = self.legs.setdefault(call_id, Leg())
            leg.parent = leg.parent or data.get("parent_call_id")
            leg.direction = leg.direction or data.get("direction", "")
            leg.events[kind] += 1
        self.changed.set()
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/voice", self.voice)
        app.router.add_post("/events", self.event)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0, backlog=1024).start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def finals(self, call_id: str) -> int:
        leg = self.legs.get(call_id)
        return sum(leg.events[k] for k in FINAL) if leg else 0

    def all_final(self) -> bool:
        ids = self.started | set(self.legs)
        return all(self.finals(c) >= 1 for c in ids)

    def final_counts(self) -> dict[str, int]:
        """Legs by role and number of final events: `caller legs with 1 final`, ..."""
        out: Counter[str] = Counter()
        parents = self.started | {c for c, leg in self.legs.items() if not leg.parent}
        for c in parents:
            out[f"caller legs with {self.finals(c)} final(s)"] += 1
        for c, leg in self.legs.items():
            if leg.parent:
                out[f"dial legs with {self.finals(c)} final(s)"] += 1
        return dict(sorted(out.items()))


# ------------------------------------------------------------------------ systems under test


@dataclass
class Sut:
    """What the carrier calls: its front's port, the process tree whose CPU counts, and how to
    stop it."""

    port: int
    tree: proc.Node
    workers: int
    stop: Callable[[], Awaitable[None]]
    worker_procs: Callable[[], list[Any]]
    after: Callable[[], dict[str, int]] = dict
    ready_s: float = math.nan
    rtp: range = range(0)  # the workers' RTP ports


def launch_bare(
    work: Path, n: int, sip: int, rtp: int, kam_port: int, args: argparse.Namespace
) -> tuple[list[subprocess.Popen[bytes]], int]:
    """Start n bare workers and the front (Kamailio daemonizes: its exit code says whether it
    started)."""
    workers: list[subprocess.Popen[bytes]] = []
    for i in range(n):
        with (work / f"bare-{sip + i}.out").open("wb") as out:
            workers.append(
                subprocess.Popen(
                    [
                        args.python,
                        str(HERE / "bare_bridge_worker.py"),
                        str(sip + i),
                        str(rtp + i * RTP_PER_WORKER),
                        str(RTP_PER_WORKER),
                        "8000",
                        f"127.0.0.1:{kam_port}",
                        CALLEE,
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    with (work / "kam.log").open("wb") as log:
        rc = subprocess.run(
            ["kamailio", "-f", str(work / "kam.cfg"), "-P", str(work / "kam.pid")],
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    return workers, rc


async def start_bare(pairs: int, work: Path, callee_port: int, args: argparse.Namespace) -> Sut:
    n = math.ceil(pairs / PAIRS_PER_WORKER)
    sip = free_block(args.worker_port, n, args.worker_port + 500)
    rtp = free_block(args.rtp_port, n * RTP_PER_WORKER, 32768)
    kam_port = free_port(socket.SOCK_DGRAM)
    (work / "ds.list").write_text("".join(f"1 sip:127.0.0.1:{sip + i}\n" for i in range(n)))
    cfg = (HERE / "kamailio.cfg.tmpl").read_text()
    for k, v in {
        "@LIST@": str(work / "ds.list"),
        "@PORT@": str(kam_port),
        "@CHILDREN@": str(args.kamailio_children),
        "@CALLEE_USER@": CALLEE,
        "@CALLEE@": f"127.0.0.1:{callee_port}",
    }.items():
        cfg = cfg.replace(k, v)
    (work / "kam.cfg").write_text(cfg)
    t0 = time.monotonic()
    workers, rc = await asyncio.to_thread(launch_bare, work, n, sip, rtp, kam_port, args)

    def kam_pids() -> set[int]:
        return proc.pids_mentioning(str(work / "kam.cfg"))

    async def stop() -> None:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            await stop_proc(w, 10)
        pids = kam_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for _ in range(30):
            if not any(proc.alive(p) for p in pids):
                break
            await asyncio.sleep(0.1)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    if rc != 0:
        await stop()
        raise RuntimeError(f"kamailio did not start (rc {rc}): see {work / 'kam.log'}")
    missing = await wait_sip([kam_port] + [sip + i for i in range(n)], 20 + n * 0.2)
    if missing:
        await stop()
        raise RuntimeError(f"bare workers not answering OPTIONS: ports {missing[:10]}")

    def counts() -> dict[str, int]:
        total: Counter[str] = Counter()
        for path in work.glob("bare-*.out"):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        total.update({k: v for k, v in json.loads(line).items() if k != "port"})
        return dict(total)

    tree = proc.Node({w.pid for w in workers}, kam_pids())
    return Sut(
        kam_port,
        tree,
        n,
        stop,
        lambda: [proc.process(w.pid) for w in workers],
        counts,
        time.monotonic() - t0,
        range(rtp, rtp + n * RTP_PER_WORKER + RTP_SLACK),
    )


def node_config(
    work: Path, peer: Peer, workers: int, callee_port: int, args: argparse.Namespace
) -> tuple[Path, int, str, range]:
    sip_port, api_port = free_port(both=True), free_port()
    worker_port = free_block(args.worker_port, workers, args.worker_port + 500, tcp=True)
    rtp_port = free_block(args.rtp_port, workers * RTP_PER_WORKER, 32768)
    path = work / "gateway.toml"
    path.write_text(f"""
[sip]
listen = "127.0.0.1:{sip_port}"
[api]
listen = "127.0.0.1:{api_port}"
token = "{secrets.token_hex(16)}"
[control_plane]
events_url = "{peer.base}/events"
secret = "{peer.cp_secret}"
[callbacks]
timeout_s = 10
allow_http = true
allow_private = true
[storage]
dir = "{work / "var"}"
[media]
rtp_port_start = {rtp_port}
rtp_ports_per_worker = {RTP_PER_WORKER}
[workers]
count = {workers}
calls_per_worker = {args.node_calls_per_worker}
reserved_slots = {args.reserved_slots}
host = "127.0.0.1"
sip_port_start = {worker_port}
[kamailio]
mode = "managed"
children = {args.kamailio_children}
flood_limit = 0
[log]
level = "INFO"

[[numbers]]
e164 = "{NUMBER}"
number_id = "num_bridges"
workspace_id = "ws_bridges"
voice_callback_url = "{peer.base}/voice"
webhook_secret = "{peer.app_secret}"

[[trunks]]
name = "callee"
address = "127.0.0.1:{callee_port}"
transport = "udp"
max_cps = 10000
""")
    rtp = range(rtp_port, rtp_port + workers * RTP_PER_WORKER + RTP_SLACK)
    return path, sip_port, f"http://127.0.0.1:{api_port}", rtp


async def start_node(
    pairs: int, work: Path, callee_port: int, args: argparse.Namespace, peer: Peer
) -> Sut:
    if args.cross_worker:  # one slot per worker: every dial leg lands on another worker
        n = 2 * pairs
    else:
        n = math.ceil(pairs / (args.node_calls_per_worker - args.reserved_slots))
    config, sip_port, api, rtp = node_config(work, peer, n, callee_port, args)
    started = await asyncio.to_thread(
        start_gateway, config, work / "gateway.log", api, args.ready_timeout + 1.5 * n
    )
    gw = started.proc

    async def stop() -> None:
        await asyncio.to_thread(stop_gateway, gw)

    tree = proc.Node({gw.pid}, proc.pids_mentioning(str(work)))
    await asyncio.sleep(args.settle)  # the front's first OPTIONS probes of every worker
    return Sut(sip_port, tree, n, stop, tree.workers, dict, started.ready_s, rtp)


def records_parents(work: Path) -> dict[str, str]:
    """The node's call records (read-only, after the node stopped): callee leg's SIP Call-ID
    -> its caller's, for the calls whose stored data carries `sip_call_id`."""
    path = work / "var" / "calls.sqlite3"
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            rows = db.execute("SELECT call_id, parent_call_id, data FROM calls").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    sip: dict[str, str] = {}
    parent: dict[str, str] = {}
    for call_id, parent_id, data in rows:
        with contextlib.suppress(ValueError, TypeError):
            if sid := (json.loads(data) or {}).get("sip_call_id"):
                sip[call_id] = sid
        if parent_id:
            parent[call_id] = parent_id
    return {sip[c]: sip[p] for c, p in parent.items() if c in sip and p in sip}


# ------------------------------------------------------------------------ one level


async def run_level(
    side: str, pairs: int, kind: str, args: argparse.Namespace, base: Path, peer: Peer | None
) -> Level:
    res = Level(side, pairs, kind, rate=rate_for(pairs, args))
    work = base / f"{side}-{kind}-{pairs}"
    work.mkdir(parents=True)
    res.work = str(work)
    t_level = time.monotonic()
    talk_ms = args.probe_talk_ms if kind == "probe" else args.talk_ms
    calls = pairs if kind == "probe" else 2 * pairs
    callee_port = free_port(both=True)
    say(
        f"\n== {since_start()} {side} {kind} {pairs} pair(s): SIPp -l {pairs} -m {calls} "
        f"-r {res.rate:g}, talk {talk_ms / 1000:g} s, the {args.hangup} hangs up"
    )
    if peer is not None:
        peer.reset()
    try:
        if side == "bare":
            sut = await start_bare(pairs, work, callee_port, args)
        else:
            assert peer is not None
            sut = await start_node(pairs, work, callee_port, args, peer)
    except RuntimeError as e:
        res.attempted = res.failed = calls
        res.reasons.append(str(e).splitlines()[0])
        say(f"   ! {e}")
        return res
    res.workers, res.ready_s = sut.workers, sut.ready_s
    say(
        f"   {sut.workers} {'bare ' if side == 'bare' else ''}worker(s) up in "
        f"{sut.ready_s:.1f}s; front 127.0.0.1:{sut.port}"
    )
    callee_xml = HERE / ("callee_hangs_up.xml" if args.hangup == "callee" else "callee.xml")
    carrier_xml = HERE / ("carrier_waits.xml" if args.hangup == "callee" else "carrier.xml")
    trace = ["-trace_msg", "-trace_err", "-trace_stat", "-fd", "1", "-nostdin"]
    callee_cmd = [
        "sipp",
        "-sf",
        str(callee_xml),
        "-i",
        "127.0.0.1",
        "-p",
        str(callee_port),
        "-mp",
        str(args.callee_media_port),
        "-m",
        str(calls),
        "-stf",
        "callee_stat.csv",
        *(["-d", str(talk_ms)] if args.hangup == "callee" else []),
        *trace,
    ]
    timeout = calls / res.rate + talk_ms / 1000 + 60
    carrier_cmd = [
        "sipp",
        "-sf",
        str(carrier_xml),
        f"127.0.0.1:{sut.port}",
        "-s",
        NUMBER,
        "-m",
        str(calls),
        "-l",
        str(pairs),
        *rate_args(res.rate),
        *(["-d", str(talk_ms)] if args.hangup == "caller" else []),
        "-i",
        "127.0.0.1",
        "-p",
        str(free_port(both=True)),
        "-mp",
        str(args.carrier_media_port),
        "-stf",
        "carrier_stat.csv",
        "-timeout",
        str(int(timeout)),
        "-timeout_error",
        *trace,
    ]
    res.carrier_cmd = carrier_cmd
    sipps: list[asyncio.subprocess.Process] = []
    sniffer: AudioSniffer | None = None
    try:
        with (work / "callee.out").open("wb") as out:
            callee = await asyncio.create_subprocess_exec(
                *callee_cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT
            )
        sipps.append(callee)
        for _ in range(50):
            if udp_bound(callee_port) or callee.returncode is not None:
                break
            await asyncio.sleep(0.1)
        m0, cpu0, own0 = proc.machine_cpu(), sut.tree.cpu(), proc.own_cpu()
        th0 = proc.thread_split(p for p in sut.worker_procs() if p is not None)
        if pairs <= AUDIO_CHECK_PAIRS:
            sniffer = AudioSniffer(
                sut.rtp,
                range(args.carrier_media_port, args.carrier_media_port + 10000),
                range(args.callee_media_port, args.callee_media_port + 10000),
            )
            sniffer.start()
        with (work / "carrier.out").open("wb") as out:
            carrier = await asyncio.create_subprocess_exec(
                *carrier_cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT
            )
            sipps.append(carrier)
            rc = await carrier.wait()
        # The callee's SIPp ends by itself after its -m calls; when some never came, a soft
        # stop (SIGUSR1: no new calls, live ones end), then a hard one.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(callee.wait(), 10)
        await stop_proc(callee, 5, signal.SIGUSR1)
        m1, cpu1, own1 = proc.machine_cpu(), sut.tree.cpu(), proc.own_cpu()
        th1 = proc.thread_split(p for p in sut.worker_procs() if p is not None)
        if sniffer is not None:
            sniffer.stop()
        if peer is not None:  # every leg's final event; stragglers get a few seconds
            deadline = time.monotonic() + 10 + pairs / 20
            while not peer.all_final() and time.monotonic() < deadline:
                peer.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(peer.changed.wait(), 0.5)
    finally:  # also when cancelled (the run's watchdog, ^C): nothing of ours outlives it
        if sniffer is not None:
            sniffer.stop()
        for p in sipps:
            await stop_proc(p, 3)
        await sut.stop()
    res.bare_counts = sut.after()
    if rc != 0:
        res.reasons.append(f"carrier SIPp exit code {rc}")

    # -- SIPp's counts and traces
    cs, ks = read_stat(work / "carrier_stat.csv"), read_stat(work / "callee_stat.csv")
    res.carrier_ok, res.carrier_failed = (
        stat_int(cs, "SuccessfulCall(C)"),
        stat_int(cs, "FailedCall(C)"),
    )
    res.callee_ok, res.callee_failed = (
        stat_int(ks, "SuccessfulCall(C)"),
        stat_int(ks, "FailedCall(C)"),
    )
    res.reasons += [f"carrier SIPp {k}" for k in failure_kinds(cs)]
    res.reasons += [f"callee SIPp {k}" for k in failure_kinds(ks)]
    carrier_calls = list(read_trace(work, carrier_xml.stem).values())
    callee_calls = list(read_trace(work, callee_xml.stem).values())
    res.attempted = sum(1 for c in carrier_calls if ">INVITE" in c.at) or calls
    res.callee_invites = sum(1 for c in callee_calls if "<INVITE" in c.at)
    res.refused = dict(Counter(code for c in carrier_calls for code in c.codes))
    spans = [
        (c.at[">INVITE"], end)
        for c in carrier_calls
        if ">INVITE" in c.at and (end := c.at.get(">BYE") or c.at.get("<BYE") or 0.0)
    ]
    res.peak_pairs = peak_concurrency(spans)
    res.setup["carrier INVITE -> 200"] = summary(
        [s for c in carrier_calls if (s := c.span_ms(">INVITE", "<200 INVITE")) is not None]
    )
    matched, res.legs_matched_exactly = match_legs(
        carrier_calls, callee_calls, records_parents(work) if side == "node" else None
    )
    res.setup["carrier INVITE -> callee INVITE"] = summary(
        [(b.at["<INVITE"] - a.at[">INVITE"]) * 1000 for a, b in matched]
    )
    res.setup["callee 200 -> ACK"] = summary(
        [s for c in callee_calls if (s := c.span_ms(">200 INVITE", "<ACK")) is not None]
    )
    lengths = [
        end - c.at["<ACK"]
        for c in callee_calls
        if "<ACK" in c.at and (end := c.at.get("<BYE") or c.at.get(">BYE") or 0.0)
    ]
    res.pair_s = sum(lengths)
    if lengths:
        res.pair_s_p50 = sorted(lengths)[len(lengths) // 2]

    # -- CPU
    busy, total = m1[0] - m0[0], m1[1] - m0[1]
    res.machine_busy_pct = 100 * busy / max(1e-9, total)
    res.sut_cpu_s = cpu1 - cpu0
    res.bench_cpu_s = own1[0] - own0[0]
    res.sipp_cpu_s = own1[1] - own0[1]  # reaped children: the two SIPps
    others = busy - res.sut_cpu_s - res.bench_cpu_s - res.sipp_cpu_s
    res.others_pct = max(0.0, 100 * others / max(1e-9, total))
    if res.pair_s > 0:
        res.cpu_ms_per_pair_s = res.sut_cpu_s * 1000 / res.pair_s
    res.threads = {k: 100 * v / max(1e-9, total) for k, v in (th1 - th0).most_common() if v > 0}

    # -- audio: while each callee leg was bridged (ACK + 0.3 s .. its end), was each side's
    # speech on the wire towards the other? (Ringback before the answer is left out.)
    windows = [
        (c.at["<ACK"] + 0.3, end - 0.2)
        for c in callee_calls
        if "<ACK" in c.at and (end := c.at.get("<BYE") or c.at.get(">BYE") or 0.0)
    ]
    if sniffer is not None and windows:
        if sniffer.error:
            res.audio["error"] = sniffer.error
        else:
            for way, ms in sniffer.latency().items():
                res.setup[f"bridge one-way {way}"] = summary(ms)
            for side in ("caller", "callee"):
                loud, total = sniffer.loud(side, windows)
                res.audio[f"to {side}"] = f"{loud} loud of {total}"
                if total == 0 or loud < LOUD_SHARE * total:
                    res.reasons.append(
                        f"no audio to the {side} through the bridge: {loud} "
                        f"loud RTP packets of {total} while bridged"
                    )

    # -- failures
    ok = min(res.carrier_ok, res.callee_ok)
    if any(w.startswith("no audio") for w in res.reasons):
        ok = 0
    if peer is not None:
        res.finals = peer.final_counts()
        res.app = dict(peer.app)
        res.events = dict(peer.events)
        one = {"caller": 0, "dial": 0}
        for k, v in res.finals.items():
            role = k.split()[0]
            if k.endswith(" 1 final(s)"):
                one[role] += v
            else:
                res.reasons.append(f"{v} {k}")
        ok = min(ok, one["caller"], one["dial"])
        if peer.bad_signatures:
            res.reasons.append(f"{peer.bad_signatures} bad signature(s)")
    res.ok = ok
    res.failed = max(0, calls - ok)
    if res.failed and res.callee_invites < res.attempted:
        res.reasons.append(f"callee got {res.callee_invites} INVITE(s) for {res.attempted} calls")
    for code, n in sorted(res.refused.items()):
        res.reasons.append(f"carrier's INVITE answered {code} x{n}")
    res.wall_s = time.monotonic() - t_level
    print_level(res)
    return res


def print_level(r: Level) -> None:
    say(
        f"   pairs {r.ok} ok / {r.failed} failed of {r.attempted} (peak {r.peak_pairs} concurrent"
        f"); carrier SIPp {r.carrier_ok}/{r.carrier_failed}, callee SIPp "
        f"{r.callee_ok}/{r.callee_failed} ({r.callee_invites} INVITEs)"
    )
    for name, s in r.setup.items():
        exact = ""
        if name == "carrier INVITE -> callee INVITE" and s.get("n"):
            exact = f" ({r.legs_matched_exactly} paired by Call-ID, the rest by time)"
        say(f"   {name}: {fmt_summary(s)}{exact}")
    say(
        f"   CPU: system under test {r.sut_cpu_s:.1f} s = {r.cpu_ms_per_pair_s:.2f} ms per bridged "
        f"pair-second ({r.pair_s:.0f} pair-s, median pair {r.pair_s_p50:.1f} s); machine busy "
        f"{r.machine_busy_pct:.0f} % (not ours {r.others_pct:.0f} %); SIPp {r.sipp_cpu_s:.1f} s, "
        f"this process (voice app, events) {r.bench_cpu_s:.1f} s"
    )
    if r.threads:
        say(
            "   worker threads (% of the machine): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.threads.items())
        )
    if r.finals:
        say(f"   final events per leg: {r.finals}")
    if r.app:
        say(f"   voice app: {r.app}; events {r.events}")
    if r.bare_counts:
        say(f"   bare workers: {r.bare_counts}")
    if r.audio:
        say(f"   audio on the wire while bridged: {r.audio}")
    for why in r.reasons:
        say(f"   ! {why}")
    say(f"   ({r.wall_s:.0f} s; work dir {r.work})")


# ------------------------------------------------------------------------ sweeps


async def sweep(levels: list[int], run: Callable[[int, str], Awaitable[int]]) -> None:
    """Levels in order; at the first with a failure, one level halfway between the last good
    one and it (when the gap is wide enough), then stop."""
    good = 0
    for lv in sorted(levels):
        failed = await run(lv, "sweep")
        if failed < 0:  # out of time
            return
        if failed == 0:
            good = lv
            continue
        if lv - good > BISECT_MIN_GAP:
            await run((good + lv) // 2, "bisect")
        return


def node_broken(r: Level, work: Path) -> str:
    """Why the probe pair says the node cannot bridge yet ('' when it bridged)."""
    if r.callee_invites and r.ok and r.failed == 0:
        return ""
    log = work / "gateway.log"
    hints = []
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            low = line.lower()
            if " info " in low:
                continue  # the startup line mentions dial legs too
            if any(w in low for w in ("dial", "traceback", "error", "not supported")):
                hints.append(line.strip()[:240])
    what = (
        f"the probe pair did not bridge: callee SIPp got {r.callee_invites} INVITE(s); carrier "
        f"{r.carrier_ok} ok / {r.carrier_failed} failed (INVITE answers {r.refused or 'none'}"
        f" other than 200); voice app {r.app or 'no request'}; events {r.events or 'none'}"
    )
    if not r.callee_invites:
        what += " -- dial does not place the callee's leg on this tree yet (dial verb missing?)"
    if hints:
        what += "; gateway.log: " + " | ".join(hints[-4:])
    return what


def over_budget(share: float, what: str, args: argparse.Namespace) -> bool:
    """True (and says so) once the run has used `share` of --budget-min: the sweep stops
    there, so one run stays bounded whatever the levels."""
    if time.monotonic() - T0 < share * args.budget_min * 60:
        return False
    say(
        f"\n== {since_start()} time budget: no more {what} levels "
        f"({share:.0%} of --budget-min {args.budget_min:g} used)"
    )
    return True


async def amain(args: argparse.Namespace, base: Path, s: Sitting) -> None:
    async def bare(lv: int, kind: str) -> int:
        if over_budget(0.4 if not args.bare_only else 0.9, "bare", args):
            return -1
        s.bare.append(await run_level("bare", lv, kind, args, base, None))
        return s.bare[-1].failed

    if not args.node_only:
        # One pair first, as on the node: the one-way delay through the bridge, on the audio.
        s.bare.append(await run_level("bare", 1, "probe", args, base, None))
        if args.quick:
            for lv in args.level_list:
                await bare(lv, "sweep")
        else:
            await sweep(args.level_list, bare)
    if args.bare_only:
        return
    peer = Peer()
    await peer.start()
    try:
        probe = await run_level("node", 1, "probe", args, base, peer)
        s.node.append(probe)
        s.node_broken = node_broken(probe, Path(probe.work))
        if s.node_broken and args.no_gate:
            say(f"\n!! the node's probe pair failed, going on (--no-gate): {s.node_broken}")
            s.node_broken = ""
        elif s.node_broken:
            say(f"\n!! NODE RUN FAILED: {s.node_broken}")
            return

        async def node(lv: int, kind: str) -> int:
            if over_budget(0.85, "node", args):
                return -1
            s.node.append(await run_level("node", lv, kind, args, base, peer))
            return s.node[-1].failed

        node_levels = args.node_level_list or args.level_list
        if args.quick:
            for lv in node_levels:
                await node(lv, "sweep")
        else:
            await sweep(node_levels, node)
    finally:
        await peer.stop()


# ------------------------------------------------------------------------ report


def fmt(x: float, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def table(levels: list[Level]) -> list[str]:
    out = [
        "| pairs | kind | workers | pairs ok / failed | peak | carrier INVITE→200 p50 / p99 ms "
        "| INVITE→callee INVITE p50 / p99 ms | callee 200→ACK p50 / p99 ms | CPU ms per "
        "pair-second | machine busy % (not ours) | final events per leg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in levels:
        a = r.setup.get("carrier INVITE -> 200", {})
        b = r.setup.get("carrier INVITE -> callee INVITE", {})
        c = r.setup.get("callee 200 -> ACK", {})
        finals = "; ".join(f"{k}: {v}" for k, v in r.finals.items()) or "–"
        out.append(
            f"| {r.pairs} | {r.kind} | {r.workers} | {r.ok} / {r.failed} | {r.peak_pairs} | "
            f"{fmt(a.get('p50', math.nan))} / {fmt(a.get('p99', math.nan))} | "
            f"{fmt(b.get('p50', math.nan))} / {fmt(b.get('p99', math.nan))} | "
            f"{fmt(c.get('p50', math.nan))} / {fmt(c.get('p99', math.nan))} | "
            f"{fmt(r.cpu_ms_per_pair_s, 2)} | {fmt(r.machine_busy_pct, 0)} "
            f"({fmt(r.others_pct, 0)}) | {finals} |"
        )
    return out


def report(s: Sitting, args: argparse.Namespace) -> str:
    bare_cap, node_cap = held(s.bare), held(s.node)
    cmd = shlex.join([".venv/bin/python", "bench/bridges.py", *s.argv])
    lines = [
        f"# Bridged calls: node vs bare pjsua2 bridge ceiling, {s.started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}` (commit {s.commit}, {s.wall_s / 60:.1f} min, load average "
        f"{s.load_before:.1f} before; the {args.hangup} hangs up; talk "
        f"{args.talk_ms / 1000:g} s; node workers: calls_per_worker "
        f"{args.node_calls_per_worker}, reserved_slots {args.reserved_slots}"
        f"{' -- cross-worker bridges' if args.cross_worker else ''}).",
        "",
        "## Result",
        "",
    ]
    swept = [r for r in s.bare if r.kind != "probe"]
    if swept:
        lines.append(
            f"- Bare pjsua2 bridge ceiling: **{bare_cap} pairs** with 0 failures "
            f"(levels run: {', '.join(str(r.pairs) for r in swept)})"
            + (LOWER_BOUND if all(r.failed == 0 for r in swept) else ".")
        )
    elif s.bare:
        lines.append("- Bare pjsua2 bridge ceiling: no level run beyond the probe.")
    if s.node_broken:
        lines.append(f"- Node: **not measured** -- {s.node_broken}")
    elif [r for r in s.node if r.kind != "probe"]:
        ratio = f"{node_cap / bare_cap:.2f}" if bare_cap else "– (no bare ceiling this run)"
        goal = ""
        if bare_cap:
            goal = " (goal ≥ 0.8: " + ("met" if node_cap / bare_cap >= 0.8 else "not met") + ")"
        lines.append(
            f"- Node: **{node_cap} pairs** with 0 failures; ratio to the bare ceiling "
            f"**{ratio}**{goal}" + (LOWER_BOUND if all(r.failed == 0 for r in s.node) else ".")
        )

    def at_cap(levels: list[Level], cap: int) -> Level | None:
        return next((r for r in levels if r.pairs == cap and r.kind != "probe"), None)

    for name, levels, cap in (("bare", s.bare, bare_cap), ("node", s.node, node_cap)):
        r = at_cap(levels, cap)
        if r:
            lines.append(
                f"- {name} at {cap} pairs: {fmt(r.cpu_ms_per_pair_s, 2)} ms CPU per bridged "
                f"pair-second ({TREE[name]}), carrier INVITE→200 p50 "
                f"{fmt(r.setup['carrier INVITE -> 200']['p50'])} ms, INVITE→callee INVITE p50 "
                f"{fmt(r.setup['carrier INVITE -> callee INVITE']['p50'])} ms."
            )
    for name, levels in (("bare", s.bare), ("node", s.node)):
        probe = next((r for r in levels if r.kind == "probe"), None)
        if probe is None:
            continue
        ways = [
            f"{w[len('bridge one-way ') :]} p50 {fmt(v['p50'])} / p99 {fmt(v['p99'])} ms"
            for w, v in probe.setup.items()
            if w.startswith("bridge one-way") and v.get("n")
        ]
        if ways:
            lines.append(
                f"- {name}, one pair: one-way through the bridge (RTP in → RTP out, "
                f"the same PCMA bytes, kernel stamps): {'; '.join(ways)}."
            )
    for name, levels in (("Bare ceiling", s.bare), ("Node", s.node)):
        if not levels:
            continue
        lines += ["", f"## {name}", "", *table(levels), ""]
        for r in levels:
            extra = []
            if r.bare_counts:
                extra.append(f"bare workers {r.bare_counts}")
            if r.audio:
                extra.append(f"audio while bridged {r.audio}")
            if r.app:
                extra.append(f"voice app {r.app}")
            if r.threads:
                extra.append(
                    "worker threads % of machine: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in r.threads.items())
                )
            extra += [f"! {w}" for w in r.reasons]
            if extra:
                lines.append(f"- {r.pairs} ({r.kind}): " + "; ".join(extra))
        if levels[-1].carrier_cmd:
            lines += ["", f"Carrier SIPp (last level): `{shlex.join(levels[-1].carrier_cmd)}`"]
    lines += [
        "",
        "## How to read it",
        "",
        "- A pair fails if the carrier's or the callee's SIPp failed its call, the INVITE was "
        "refused, or (node) a leg did not get exactly one final event.",
        "- INVITE→callee INVITE pairs the legs by Call-ID where known (the bare workers' "
        "X-Bench-Parent header; the node's call records when they hold sip_call_id), else by "
        "time; callee 200→ACK is the bridge taking the callee's answer. The callee rings "
        "300 ms before answering.",
        "- One-way through the bridge (probe pairs, levels ≤ 4 pairs): RTP on lo, the same "
        "PCMA bytes in from one carrier and out to the other, kernel stamps.",
        "- CPU per bridged pair-second: the system under test's CPU (psutil, user+system, over "
        "the SIPp run) over the sum of callee ACK→BYE; SIPp and this process are not counted.",
        "- Levels are concurrent pairs (SIPp -l P, 2P calls); each level a fresh ceiling/node.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--pairs", default="25,50,100,150,200,250", help="concurrent pairs to try")
    ap.add_argument("--node-pairs", default="", help="node levels (default: --pairs)")
    ap.add_argument("--quick", action="store_true", help="bare 4,10 and node 4 pairs (~2 min)")
    ap.add_argument("--bare-only", action="store_true")
    ap.add_argument("--node-only", action="store_true")
    ap.add_argument("--hangup", choices=("caller", "callee"), default="caller")
    ap.add_argument("--cps", type=float, default=0, help="SIPp -r (default: 1.5 P / 9.5 s)")
    ap.add_argument("--talk-ms", type=int, default=9000, help="ACK -> BYE of the side hanging up")
    ap.add_argument("--probe-talk-ms", type=int, default=5000)
    ap.add_argument(
        "--cross-worker",
        action="store_true",
        help="node workers of one call slot (calls_per_worker 1, reserved_slots 0, 2P workers): "
        "every bridge spans two workers, joined by a media link (its one-way delay, its cost)",
    )
    ap.add_argument(
        "--no-gate",
        action="store_true",
        help="run the node's levels even when its probe pair fails (development)",
    )
    ap.add_argument(
        "--reserved-slots",
        type=int,
        default=2,
        help="node workers.reserved_slots (2: two inbound calls per worker, a slot "
        "for each one's dial leg)",
    )
    ap.add_argument(
        "--budget-min",
        type=float,
        default=14.0,
        help="no new level after this many minutes (bare levels: 40 %% of it)",
    )
    ap.add_argument("--kamailio-children", type=int, default=4)
    ap.add_argument("--settle", type=float, default=3.0, help="node: seconds after ready")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--worker-port", type=int, default=25000, help="first worker SIP port")
    ap.add_argument("--rtp-port", type=int, default=25500, help="first worker RTP port")
    ap.add_argument("--carrier-media-port", type=int, default=10000)
    ap.add_argument("--callee-media-port", type=int, default=20000)
    ap.add_argument("--python", default=sys.executable, help="Python with pjsua2 (bare workers)")
    ap.add_argument("--out", type=Path, default=None, help="markdown report path")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    if args.quick:
        args.pairs = "4,10" if args.pairs == ap.get_default("pairs") else args.pairs
        args.node_pairs = args.node_pairs or "4"
    args.node_calls_per_worker = 4
    if args.cross_worker:
        args.node_calls_per_worker, args.reserved_slots = 1, 0
    args.level_list = [int(x) for x in args.pairs.split(",") if x.strip()]
    args.node_level_list = [int(x) for x in args.node_pairs.split(",") if x.strip()]
    for tool in ("sipp", "kamailio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    if os.geteuid() != 0:
        print("warning: SIPp's pcap play needs root or CAP_NET_RAW", file=sys.stderr)
    s = Sitting(
        datetime.now(),
        sys.argv[1:],
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        os.getloadavg()[0],
    )
    base = Path(tempfile.mkdtemp(prefix="sautikit-bridges-"))
    t0 = time.monotonic()
    try:
        # A watchdog over the whole run: levels are bounded one by one, this bounds the sum.
        asyncio.run(asyncio.wait_for(amain(args, base, s), (args.budget_min + 6) * 60))
    except (Exception, KeyboardInterrupt):
        traceback.print_exc()
        say("the run stopped early: the report has what was measured")
    s.wall_s = time.monotonic() - t0
    text = report(s, args)
    suffix = "-quick" if args.quick else ("-bare" if args.bare_only else "")
    out = args.out or RESULTS / f"bridges-{s.started:%Y-%m-%d}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(s), default=str, indent=1))
    say("\n" + text)
    say(f"command: {shlex.join([sys.executable, *sys.argv])}")
    say(f"report: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    bad = any(r.failed for r in s.bare + s.node) or bool(s.node_broken)
    if args.keep or bad:
        say(f"work dir kept: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if s.node_broken or (not held(s.bare) and not args.node_only) else 0


if __name__ == "__main__":
    raise SystemExit(main())
