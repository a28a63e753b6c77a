#!/usr/bin/env python3
"""Capacity of one gateway node on this machine: an IVR call mix through Kamailio, under SIPp.

For each concurrency level C it starts a fresh node and drives it, all on 127.0.0.1, all real:
  * a voice app + events receiver (aiohttp, in this process). First request of a call ->
    say (about 2.8 s of espeak-ng English) + getDigits (numDigits 1, timeout 5); the `Digits`
    request -> record (maxLength 5, timeout 0 = no silence stop, playBeep); the record result
    -> hangup. Every request and every event is signature-checked and counted per call.
  * the gateway, `python -m gateway.cli run --config FILE`: `[kamailio] mode = "managed"` (the
    node runs Kamailio on `[sip] listen` and dispatches to its workers by load), `[workers]
    calls_per_worker = 4`, `reserved_slots = 0`, `count = ceil(C / 4)` (--reserved-slots and
    --headroom for what-ifs), events to the receiver through `[control_plane] events_url` (so
    event delivery is part of the load), storage in a temp dir.
  * SIPp as the carrier through Kamailio, bench/sipp/ivr_carrier.xml: `-l C -m 2C -r CPS`;
    the caller presses 1 (RFC 4733 pcap) after the prompt and speaks (g711a.pcap) into the
    recording, then answers the gateway's BYE. A refused INVITE (503 ...) is ACKed and counted.
While SIPp runs it samples (psutil), every second, the whole machine's CPU (busy =
user+nice+system over user+nice+system+idle+iowait, as the ceiling's run.sh counts it) and the
RSS of the node's process tree (supervisor, workers, Kamailio), every 5 s its PSS; around the
run, the CPU of each process role and of each worker thread (asyncio loop, pjmedia clock and
media). INVITE -> 200 per call comes from SIPp's message trace, as in bench/setup_time.py.

A call counts as failed if SIPp failed it, or the voice app did not see all three requests
(start, Digits=1, record result) for it, or its `call.completed` event never arrived.

The sweep runs --levels in order, stops at the first level with a failed call and runs one
more level halfway (to a multiple of 25) between the last good and that one. Then, in the same
sitting:
  * the stack's bare ceiling (`/work/shared/bench/ceiling/run.sh N CPS PYTHON`: N bare pjsua2
    workers x 4 calls behind Kamailio, same SIPp rate) at the same levels (N = ceil(C / 4)),
    the same way; gateway capacity / ceiling capacity, capacity being the highest level run
    with 0 failed calls;
  * two levels at 50 % and 80 % of the gateway's capacity (--no-fractions to skip);
  * an overload run: 1.5 C offered (`-l 1.5C`, at a rate that reaches it) to a node sized for
    C; refusals at the INVITE (code, Retry-After) and answered calls that completed or failed;
  * a sustained run (--sustain-s, default 300): 0.8 C / call length calls per second with no
    call limit, sampling every 10 s the node's RSS/PSS, outbox depth and live calls; a leak
    verdict from the last 4 minutes.

Writes the table and the commands to stdout and bench/results/capacity-<date>.md, and plots
INVITE->200 p99, CPU and memory against concurrent calls into docs/capacity.png (matplotlib,
if installed; the plot is skipped otherwise); every figure also goes to a .json next to the
report (--render FILE.json redoes report and plot from it).

usage: .venv/bin/python bench/capacity.py [--levels 250,300,350,400,450] [--cps 50]
           [--quick] [--no-ceiling | --ceiling-only] [--no-fractions] [--no-overload]
           [--sustain-s 300] [--overload-only | --sustain-only] [--capacity C]
           [--sustain-level N] [--headroom 0] [--reserved-slots 0] [--profile]
           [--render FILE.json] [--keep]
Needs root (SIPp's pcap play). --quick: one level of 30 calls (and one bisect if it fails)
and a 32-call ceiling, no overload or sustained run, ~2 min.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import capacity_proc as proc  # noqa: E402
import capacity_report  # noqa: E402
from capacity_report import rel  # noqa: E402
from capacity_results import (  # noqa: E402
    CeilingResult,
    LevelResult,
    OverloadResult,
    Sitting,
    SustainResult,
    SustainSample,
    capacity,
    load,
    save,
    slope_per_min,
)

from gateway.demo import free_port  # noqa: E402
from gateway.events.signing import verify  # noqa: E402

SCENARIO = ROOT / "bench" / "sipp" / "ivr_carrier.xml"
CEILING = Path("/work/shared/bench/ceiling/run.sh")
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "capacity.png"
NUMBER = "+254700000001"
CALLS_PER_WORKER = 4
CEILING_CALLS_PER_WORKER = 4  # bare workers keep no slot for dial legs
CALL_S = 8.8  # INVITE -> BYE of this IVR mix when nothing lags (unless measured at capacity)
BISECT_STEP = 25
RTP_PORTS_PER_WORKER = 20
READYZ_GRACE_S = 20.0
OVERLOAD = 1.5
SUSTAIN_FRACTION = 0.8
SUSTAIN_EVERY_S = 10.0
LEAK_FIT_S = 240.0  # the leak verdict fits memory over the last 4 minutes
SAY_TEXT = "Welcome. Please press one to leave a message."  # espeak-ng en: 2.8 s
Document = dict[str, list[dict[str, Any]]]
FIRST: Document = {
    "actions": [
        {"say": {"text": SAY_TEXT}},
        {"getDigits": {"numDigits": 1, "timeout": 5}},
    ]
}
RECORD: Document = {"actions": [{"record": {"maxLength": 5, "timeout": 0, "playBeep": True}}]}
HANGUP: Document = {"actions": [{"hangup": {}}]}
FINAL_EVENTS = ("call.completed", "call.failed")
T0 = time.monotonic()  # the sitting's start: each run's header says how far in it is


def since_start() -> str:
    m, sec = divmod(int(time.monotonic() - T0), 60)
    return f"[+{m}:{sec:02d}]"


# ------------------------------------------------------------------------ voice app + events


@dataclass
class CallSeen:
    start: int = 0
    digits: int = 0
    record: int = 0
    recording_s: float | None = None
    events: Counter[str] = field(default_factory=Counter)


class Peer:
    """The customer's voice app (/voice) and the control plane's events endpoint (/events)."""

    def __init__(self) -> None:
        self.app_secret = secrets.token_hex(8)
        self.cp_secret = secrets.token_hex(8)
        self.reset()
        self.runner: web.AppRunner | None = None
        self.base = ""

    def reset(self) -> None:
        self.calls: dict[str, CallSeen] = {}
        self.kinds: Counter[str] = Counter()  # voice app requests by kind
        self.events: Counter[str] = Counter()  # events by kind
        self.bad_signatures = 0
        self.unexpected: list[str] = []
        self.handling_ms: list[float] = []
        self.final_lag_ms: list[float] = []  # call.completed: occurred_at -> received here
        self.changed = asyncio.Event()

    def _call(self, call_id: str) -> CallSeen:
        c = self.calls.get(call_id)
        if c is None:
            c = self.calls[call_id] = CallSeen()
        return c

    def _verified(self, request: web.Request, raw: bytes, secret: str) -> None:
        try:
            verify(raw, request.headers.get("X-Sautikit-Signature", ""), secret)
        except Exception:
            self.bad_signatures += 1

    async def voice(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        raw = await request.read()
        self._verified(request, raw, self.app_secret)
        form = dict(urllib.parse.parse_qsl(raw.decode(errors="replace")))
        call = self._call(form.get("callId", "?"))
        if "RecordingUrl" in form:
            kind, doc = "record", HANGUP
            call.record += 1
            with contextlib.suppress(ValueError):
                call.recording_s = float(form.get("RecordingDuration", ""))
        elif "Digits" in form:
            kind, doc = "digits", RECORD
            call.digits += 1
            if form["Digits"] != "1":
                self.unexpected.append(f"Digits={form['Digits']!r}")
                doc = HANGUP
        else:
            kind, doc = "start", FIRST
            call.start += 1
        self.kinds[kind] += 1
        reply = web.json_response(doc)
        self.handling_ms.append((time.perf_counter() - t0) * 1000)
        return reply

    async def event(self, request: web.Request) -> web.Response:
        raw = await request.read()
        now = time.time()
        self._verified(request, raw, self.cp_secret)
        try:
            body = json.loads(raw)
            kind = body.get("kind", "?")
            call_id = (body.get("data") or {}).get("call_id") or "?"
        except ValueError:
            self.unexpected.append("event body is not JSON")
            return web.Response(status=200)
        self.events[kind] += 1
        self.changed.set()
        self._call(call_id).events[kind] += 1
        if kind == "call.completed":
            with contextlib.suppress(Exception):
                at = datetime.fromisoformat(body["occurred_at"].replace("Z", "+00:00"))
                self.final_lag_ms.append((now - at.timestamp()) * 1000)
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

    def finished_calls(self) -> int:
        return sum(
            1 for c in self.calls.values() if c.start and any(c.events[k] for k in FINAL_EVENTS)
        )

    def complete_calls(self) -> int:
        """Calls that went through all three documents and got call.completed."""
        return sum(
            1
            for c in self.calls.values()
            if c.start == 1 and c.digits == 1 and c.record == 1 and c.events["call.completed"] == 1
        )


# ------------------------------------------------------------------------ SIPp output


_STAMP = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$")


def read_messages(work: Path) -> dict[str, dict[str, Any]]:
    """Per Call-ID, from SIPp's *_messages.log (wall-clock stamps in us): first INVITE sent,
    first 200 to it received, first BYE received, any other final INVITE response codes, and
    whether the first of those carried Retry-After."""
    calls: dict[str, dict[str, Any]] = {}
    for path in sorted(work.glob("*_messages.log")):
        text = path.read_text(errors="replace")
        for block in re.split(r"(?m)^(?=-{20,} \d{4}-)", text):
            lines = [ln.rstrip("\r") for ln in block.splitlines()]
            if len(lines) < 4 or not (m := _STAMP.match(lines[0])):
                continue
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            first = next((ln for ln in lines[2:] if ln.strip()), "")
            hdr: dict[str, str] = {}
            for ln in lines[2:]:
                k, sep, v = ln.partition(":")
                if sep and k.strip().lower() in ("call-id", "cseq", "retry-after"):
                    hdr.setdefault(k.strip().lower(), v.strip())
            cid, cseq = hdr.get("call-id"), hdr.get("cseq", "")
            if not cid:
                continue
            call = calls.setdefault(cid, {"codes": []})
            sent = "message sent" in lines[1]
            if sent and first.startswith("INVITE "):
                call.setdefault("invite", at)
            elif not sent and first.startswith("BYE "):
                call.setdefault("bye", at)
            elif not sent and cseq.endswith(" INVITE") and first.startswith("SIP/2.0 "):
                code = first.split()[1]
                if code == "200":
                    call.setdefault("200", at)
                elif code[0] != "1" and code not in call["codes"]:
                    if not call["codes"]:
                        call["retry_after"] = "retry-after" in hdr
                    call["codes"].append(code)
    return calls


def read_stat(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    lines = [ln.rstrip("\n") for ln in path.read_text(errors="replace").splitlines() if ln]
    head = lines[0].split(";")
    return [dict(zip(head, ln.split(";"), strict=False)) for ln in lines[1:]]


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of unsorted xs (p99 of 900 values = the 891st smallest)."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else float("nan")


def peak_concurrency(calls: list[dict[str, Any]]) -> int:
    marks = []
    for c in calls:
        if "invite" in c:
            marks.append((c["invite"], 1))
            marks.append((c.get("bye") or c.get("200") or c["invite"], -1))
    peak = cur = 0
    for _, d in sorted(marks, key=lambda m: (m[0], m[1])):
        cur += d
        peak = max(peak, cur)
    return peak


# ------------------------------------------------------------------------ profiling


@dataclass
class Profiler:
    what: str
    kind: str  # py-spy | perf | perf-all
    out: list[Path]
    procs: list[asyncio.subprocess.Process]


PYSPY_WORKERS = 6  # workers sampled by py-spy; their stacks are summed into one profile
# Leaf frames where a thread waits rather than works (py-spy --nonblocking cannot always tell).
IDLE_LEAVES = ("EpollSelector.select", "Endpoint.libHandleEvents", "select (", "epoll_wait (")


async def start_profilers(
    args: argparse.Namespace, work: Path, node: proc.Node, calls: int
) -> list[Profiler]:
    """py-spy on the supervisor and on a few workers (Python view, summed), perf on one worker
    (native view by thread) and on the whole machine, for about the length of the SIPp run."""
    pyspy = Path(sys.executable).parent / "py-spy"
    workers = sorted(p.pid for p in node.workers())
    sup = next(iter(node.roots))
    secs = str(int(calls / args.cps + 12))
    out: list[Profiler] = []

    async def spawn(what: str, kind: str, cmds: list[tuple[Path, list[str]]]) -> None:
        prof = Profiler(what, kind, [], [])
        for path, cmd in cmds:
            log = (work / f"{path.name}.log").open("wb")
            prof.procs.append(
                await asyncio.create_subprocess_exec(*cmd, stdout=log, stderr=subprocess.STDOUT)
            )
            prof.out.append(path)
        out.append(prof)

    def spy(pid: int, path: Path, rate: int) -> tuple[Path, list[str]]:
        return path, [str(pyspy), "record", "--format", "raw", "-r", str(rate), "-d", secs,
                      "-o", str(path), "-p", str(pid), "--nonblocking", "--threads"]  # fmt: skip

    if pyspy.exists():
        await spawn(f"supervisor (pid {sup})", "py-spy", [spy(sup, work / "pyspy-sup.txt", 50)])
        step = max(1, len(workers) // PYSPY_WORKERS)
        some = workers[::step][:PYSPY_WORKERS]
        await spawn(
            f"{len(some)} workers (pids {', '.join(map(str, some))}), summed",
            "py-spy",
            [spy(pid, work / f"pyspy-worker-{pid}.txt", 25) for pid in some],
        )
    else:
        print(f"   (no py-spy profile: {pyspy} missing; pip install py-spy)", flush=True)
    if shutil.which("perf") and workers:
        pid = workers[min(len(workers) - 1, len(workers) // 2 + 1)]
        path = work / "perf-worker.data"
        cmd = ["perf", "record", "-F", "199", "-o", str(path), "-p", str(pid), "--", "sleep", secs]
        await spawn(f"worker (pid {pid}, all threads)", "perf", [(path, cmd)])
        path = work / "perf-all.data"
        cmd = ["perf", "record", "-a", "-F", "99", "-o", str(path), "--", "sleep", secs]
        await spawn("whole machine", "perf-all", [(path, cmd)])
    return out


def summarize_raw(paths: list[Path], top: int = 14) -> list[str]:
    """Top leaf frames (self time) and the project's own functions (inclusive) of py-spy raw
    (collapsed stack) files, waiting frames left out; and how the samples split by thread."""
    leaf: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = idle = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frames = [f.strip() for f in stack.split(";")]
            if frames[-1].startswith(IDLE_LEAVES):
                idle += int(n)
                continue
            total += int(n)
            if frames[0].startswith("thread "):
                threads[re.sub(r"\(\d+\)", "", frames[0])] += int(n)
            leaf[frames[-1]] += int(n)
            for f in set(frames):
                if re.search(r"\((gateway|dsl|media|config)/", f):
                    ours[f] += int(n)

    def share(n: int) -> str:
        return f"{100 * n / max(1, total):5.1f}%"

    out = [f"{total} busy samples ({idle} waiting left out); self time:"]
    out += [f"{share(n)}  {frame}" for frame, n in leaf.most_common(top)]
    out.append("project functions, inclusive:")
    out += [f"{share(n)}  {frame}" for frame, n in ours.most_common(top)]
    if threads:
        out.append("by thread: " + ", ".join(f"{t} {share(n)}" for t, n in threads.most_common()))
    return out


async def summarize_perf(path: Path, sort: str = "comm,dso") -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "perf", "report", "-i", str(path), "--stdio", "--no-children", "--sort", sort,
        "--percent-limit", "1.5", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return [
        ln.strip()
        for ln in out.decode(errors="replace").splitlines()
        if ln.strip() and not ln.startswith("#") and re.match(r"^\s*[\d.]+%", ln)
    ][:14]


async def finish_profilers(profilers: list[Profiler]) -> list[str]:
    lines: list[str] = []
    for p in profilers:
        for child in p.procs:
            try:
                await asyncio.wait_for(child.wait(), 30)
            except TimeoutError:
                child.send_signal(signal.SIGINT)
                await child.wait()
        if not any(path.exists() for path in p.out):
            lines.append(f"{p.kind} {p.what}: no output (see {p.out[0].name}.log)")
            continue
        if p.kind == "py-spy":
            body, head = summarize_raw(p.out), "Python stacks"
        elif p.kind == "perf":
            body, head = await summarize_perf(p.out[0]), "samples by thread name and library"
        else:
            body = await summarize_perf(p.out[0], "comm,dso")
            body += ["top symbols:", *(await summarize_perf(p.out[0], "sym"))]
            head = "samples by process name and library"
        lines.append(f"{p.kind} {p.what}, {head} ({p.out[0].parent}):")
        lines.extend(f"    {b}" for b in body)
    return lines


def port_free(port: int, tcp: bool) -> bool:
    kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if tcp else (socket.SOCK_DGRAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sk:
            try:
                sk.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_block(start: int, count: int, stop: int, tcp: bool = False) -> int:
    """The first base from `start` on (steps of 500) whose `count` ports are free on 127.0.0.1
    and end below `stop`: another node on the machine (a test, another bench) may hold the
    default block. `start` itself if none is."""
    for base in range(start, stop - count + 1, 500):
        if all(port_free(p, tcp) for p in range(base, base + count)):
            if base != start:
                print(f"   (ports {start}+ busy: using {base}..{base + count - 1})", flush=True)
            return base
    return start


def write_config(
    work: Path, peer: Peer, workers: int, args: argparse.Namespace
) -> tuple[Path, int, str]:
    sip_port, api_port = free_port(both=True), free_port()
    # Below the ephemeral range (32768+), RTP below the workers' SIP ports.
    worker_port = free_block(args.worker_port, workers, 32000, tcp=True)
    rtp_port = free_block(args.rtp_port, workers * RTP_PORTS_PER_WORKER, args.worker_port)
    mode = args.front
    text = f"""
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
rtp_ports_per_worker = {RTP_PORTS_PER_WORKER}
[workers]
count = {workers}
calls_per_worker = {args.calls_per_worker}
reserved_slots = {args.reserved_slots}
host = "127.0.0.1"
sip_port_start = {worker_port}
[kamailio]
mode = "{mode}"
children = {args.kamailio_children}
[log]
level = "INFO"

[[numbers]]
e164 = "{NUMBER}"
number_id = "num_capacity"
workspace_id = "ws_capacity"
voice_callback_url = "{peer.base}/voice"
webhook_secret = "{peer.app_secret}"
"""
    path = work / "gateway.toml"
    path.write_text(text)
    return path, sip_port, f"http://127.0.0.1:{api_port}"


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    ready_s: float  # launch -> `sautikit-gateway ready` in the log
    readyz_s: float  # launch -> GET /readyz 200


def readyz_ok(api_base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_base}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_gateway(config: Path, log: Path, api_base: str, timeout: float) -> Started:
    """Launch the node; return once its log says ready and /readyz answers 200, with the time
    each took from the launch."""
    out = log.open("wb")
    t0 = time.monotonic()
    gw = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,  # its own process group: stopped as a whole, and only it
    )
    out.close()
    ready = readyz = math.nan
    while time.monotonic() - t0 < timeout:
        if math.isnan(ready) and b"sautikit-gateway ready" in log.read_bytes():
            ready = time.monotonic() - t0
        if math.isnan(readyz) and readyz_ok(api_base):
            readyz = time.monotonic() - t0
        if not (math.isnan(ready) or math.isnan(readyz)):
            return Started(gw, ready, readyz)
        # One of the two signs alone for a while is enough (a renamed log line, a /readyz
        # that never turns 200): go on, the report shows the other as nan.
        for seen, missing in ((ready, "/readyz 200"), (readyz, "the log's ready line")):
            if not math.isnan(seen) and time.monotonic() - t0 > seen + READYZ_GRACE_S:
                print(f"   ! no {missing} {READYZ_GRACE_S:.0f}s after the other: going on")
                return Started(gw, ready, readyz)
        if gw.poll() is not None:
            break
        time.sleep(0.1)
    stop_gateway(gw)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(
        f"gateway not ready after {time.monotonic() - t0:.0f}s (log ready {ready:.1f}s, "
        f"/readyz {readyz:.1f}s, exit {gw.returncode}); log tail:\n{tail}"
    )


def stop_gateway(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group we started (a worker or Kamailio that outlived it).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


# ------------------------------------------------------------------------ the node's /metrics


async def fetch_metrics(api_base: str) -> str | None:
    from aiohttp import ClientSession, ClientTimeout

    try:
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:
            async with http.get(f"{api_base}/metrics") as r:
                return await r.text()
    except Exception as e:  # the figures are a cross-check only
        print(f"   (no /metrics: {e})", flush=True)
        return None


_METRIC = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? ([-+]?[0-9.eE+-]+|NaN|[-+]Inf)(?: \d+)?$")


def metric_samples(text: str) -> list[tuple[str, str, float]]:
    """(name, labels text, value) of every sample in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if m := _METRIC.match(line):
            out.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return out


def setup_means(text: str) -> dict[str, float]:
    """Means of the node's own setup and voice app fetch histograms."""
    sums: dict[str, float] = {}
    for name, labels, v in metric_samples(text):
        m = re.match(r"^(sautikit_\w+?)_(sum|count)$", name)
        if m and "error" not in labels:
            sums[name] = sums.get(name, 0.0) + v
    out: dict[str, float] = {}
    for name in ("sautikit_call_setup_seconds", "sautikit_callback_fetch_seconds"):
        if sums.get(f"{name}_count"):
            out[name + "_mean_ms"] = 1000 * sums[f"{name}_sum"] / sums[f"{name}_count"]
            out[name + "_count"] = sums[f"{name}_count"]
    return out


def outbox_pending(text: str) -> float | None:
    """Outbox rows waiting for delivery: `sautikit_events_outbox{state="pending"}`, or any
    `sautikit_outbox_*` gauge with a pending state or name (the family may be renamed)."""
    found = None
    for name, labels, v in metric_samples(text):
        if not name.startswith(("sautikit_events_outbox", "sautikit_outbox")):
            continue
        if name.endswith(("_sum", "_count", "_bucket", "_created", "_total")):
            continue
        if 'state="pending"' in labels or (name.endswith("pending") and "state=" not in labels):
            found = (found or 0.0) + v
    return found


def active_calls(text: str) -> float:
    return sum(v for name, _, v in metric_samples(text) if name == "sautikit_active_calls")


def outbox_pending_db(storage: Path) -> float | None:
    """The same from the outbox file, read-only (when /metrics has no such family)."""
    path = storage / "outbox.sqlite3"
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            (n,) = db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()
        finally:
            db.close()
        return float(n)
    except sqlite3.Error:
        return None


# ------------------------------------------------------------------------ one node, one SIPp run


@dataclass
class Drive:
    """How SIPp drives one node: `-l limit -r rate`, and `-m calls` or, with calls = 0, no call
    limit: SIGUSR1 after `duration_s` (SIPp stops placing calls and lets the live ones end)."""

    kind: str
    level: int  # the level reported
    limit: int  # SIPp -l
    calls: int  # SIPp -m (0: until duration_s)
    rate: float
    duration_s: float = 0.0


@dataclass
class Live:
    """What a monitor of a running node can read."""

    api_base: str
    node: proc.Node
    storage: Path
    work: Path
    t0: float  # SIPp started (monotonic)


Monitor = Callable[[Live], Coroutine[Any, Any, None]]


def workers_for(level: int, args: argparse.Namespace) -> int:
    """ceil(level / admitted calls per worker), plus --headroom of it."""
    if args.front == "off":
        return 1
    n = math.ceil(level / (args.calls_per_worker - args.reserved_slots))
    return n + (math.ceil(n * args.headroom) if args.headroom > 0 else 0)


def rate_args(rate: float) -> list[str]:
    if rate == int(rate):
        return ["-r", str(int(rate))]
    return ["-r", str(round(rate * 10)), "-rp", "10000"]  # rate calls per 10 s


async def run_node(
    drive: Drive,
    workers: int,
    args: argparse.Namespace,
    peer: Peer,
    base: Path,
    monitor: Monitor | None = None,
) -> tuple[LevelResult, list[dict[str, Any]]]:
    """A fresh node of `workers` workers, one SIPp run against it; the figures, and SIPp's
    per-call trace (read_messages)."""
    level = drive.level
    res = LevelResult(level=level, workers=workers, kind=drive.kind, rate=drive.rate)
    work = base / f"{drive.kind}-{level}"
    work.mkdir(parents=True)
    res.work = str(work)
    peer.reset()
    config, sip_port, api_base = write_config(work, peer, workers, args)
    admit = args.calls_per_worker - args.reserved_slots
    print(
        f"\n== {since_start()} {drive.kind} {level}: {workers} worker(s) x {admit} admitted "
        f"calls, front {args.front}; SIPp -l {drive.limit} -r {drive.rate:g}"
        + (f" -m {drive.calls}" if drive.calls else f" for {drive.duration_s:.0f}s"),
        flush=True,
    )
    started = await asyncio.to_thread(
        start_gateway, config, work / "gateway.log", api_base, args.ready_timeout + 1.5 * workers
    )
    gw, res.ready_s, res.readyz_s = started.proc, started.ready_s, started.readyz_s
    print(
        f"   node ready in {res.ready_s:.1f}s, /readyz 200 after {res.readyz_s:.1f}s "
        f"(pid {gw.pid})",
        flush=True,
    )
    try:
        node = proc.Node({gw.pid}, proc.pids_mentioning(str(work)))
        sampler = proc.Sampler(node)
        # Idle cost (and time for the front's first OPTIONS probes of every worker).
        m0 = proc.machine_cpu()
        await asyncio.sleep(args.settle)
        res.idle_cpu_pct = proc.busy_pct(m0, proc.machine_cpu())
        res.rss_idle_mb = proc.rss_mb(node.members().values())
        timeout = (drive.calls / drive.rate if drive.calls else drive.duration_s) + 120
        sipp_cmd = [
            "sipp", "-sf", str(SCENARIO), f"127.0.0.1:{sip_port}", "-s", NUMBER,
            *(["-m", str(drive.calls)] if drive.calls else []),
            "-l", str(drive.limit), *rate_args(drive.rate),
            "-i", "127.0.0.1", "-p", str(free_port(both=True)), "-mp", str(args.sipp_media_port),
            "-trace_msg", "-trace_rtt", "-rtt_freq", "1", "-trace_err",
            "-trace_stat", "-stf", "stat.csv", "-fd", "1",
            "-timeout", str(int(timeout)), "-timeout_error", "-nostdin",
        ]  # fmt: skip
        res.sipp_cmd = sipp_cmd
        m0, node0 = proc.machine_cpu(), node.cpu()
        children = "sipp + profilers" if args.profile else "sipp"
        split0 = node.split(children)
        threads0 = node.worker_threads()
        sampler.start()
        calls_for_profile = drive.calls or int(drive.rate * drive.duration_s)
        profilers = (
            await start_profilers(args, work, node, calls_for_profile) if args.profile else []
        )
        t_start = time.monotonic()
        watcher: asyncio.Task[None] | None = None
        with (work / "sipp.out").open("wb") as out:
            sipp = await asyncio.create_subprocess_exec(
                *sipp_cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT
            )
            if monitor is not None:
                live = Live(api_base, node, work / "var", work, t_start)
                watcher = asyncio.create_task(monitor(live))
            if not drive.calls:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(sipp.wait()), drive.duration_s)
                if sipp.returncode is None:
                    sipp.send_signal(signal.SIGUSR1)  # soft stop: no new calls, live ones end
            res.sipp_rc = await sipp.wait()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        sipp_wall = time.monotonic() - t_start
        if profilers:
            res.profile = await finish_profilers(profilers)
        await sampler.stop()
        m1, node1 = proc.machine_cpu(), node.cpu()
        split1 = node.split(children)
        threads1 = node.worker_threads()
        # Every call that reached the app should get its final event; wait for stragglers.
        deadline = time.monotonic() + 30 + level / 20
        while peer.finished_calls() < len(peer.calls) and time.monotonic() < deadline:
            peer.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.changed.wait(), 0.5)
        text = await fetch_metrics(api_base)
        res.metrics = setup_means(text) if text else {}
    finally:
        await asyncio.to_thread(stop_gateway, gw)

    # -- SIPp
    stat = read_stat(work / "stat.csv")
    last = stat[-1] if stat else {}
    res.sipp_ok = int(last.get("SuccessfulCall(C)", 0) or 0)
    res.sipp_failed = int(last.get("FailedCall(C)", 0) or 0)
    for k, v in last.items():
        failed_kind = k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)"
        if failed_kind and v not in ("", "0"):
            res.reasons.append(f"SIPp {k[:-3]}={v}")
    if (v := last.get("Retransmissions(C)", "0")) not in ("", "0"):
        res.reasons.append(f"SIPp retransmissions={v}")
    msgs = list(read_messages(work).values())
    codes = Counter(code for c in msgs for code in c["codes"])
    for code, n in sorted(codes.items()):
        res.reasons.append(f"INVITE answered {code} x{n}")
    invites = sorted(c["invite"] for c in msgs if "invite" in c)
    res.attempted = drive.calls or len(invites)
    if len(invites) > 1:
        res.cps = (len(invites) - 1) / (invites[-1] - invites[0])
        ramp = invites[: min(level, len(invites))]
        if len(ramp) > 1:
            res.ramp_cps = (len(ramp) - 1) / (ramp[-1] - ramp[0])
    setup = [(c["200"] - c["invite"]) * 1000 for c in msgs if "200" in c and "invite" in c]
    if setup:
        res.setup_p50, res.setup_p99, res.setup_max = pct(setup, 50), pct(setup, 99), max(setup)
    lengths = [c["bye"] - c["200"] for c in msgs if "bye" in c and "200" in c]
    call_seconds = sum(lengths)
    if lengths:
        res.call_s_p50 = statistics.median(lengths)
    res.peak_calls = peak_concurrency(msgs)

    # -- voice app and events
    res.app_kinds = dict(peer.kinds)
    res.events = dict(peer.events)
    res.app_complete = peer.complete_calls()
    res.bad_signatures = peer.bad_signatures
    missing = {
        "digits": sum(1 for c in peer.calls.values() if c.start and not c.digits),
        "record result": sum(1 for c in peer.calls.values() if c.digits and not c.record),
        "call.completed": sum(
            1 for c in peer.calls.values() if c.start and not c.events["call.completed"]
        ),
    }
    for what, n in missing.items():
        if n:
            res.reasons.append(f"app: {n} call(s) without {what}")
    if peer.unexpected:
        res.reasons.append(f"unexpected: {Counter(peer.unexpected).most_common(3)}")
    if peer.bad_signatures:
        res.reasons.append(f"{peer.bad_signatures} bad signature(s)")
    if peer.final_lag_ms:
        res.final_lag_p99 = pct(peer.final_lag_ms, 99)
    if peer.handling_ms:
        res.app_handling_p99 = pct(peer.handling_ms, 99)
    recs = [c.recording_s for c in peer.calls.values() if c.recording_s is not None]
    if recs:
        res.recording_s_p50 = statistics.median(recs)
    # A refused INVITE ends as a SIPp success (the scenario accepts it), but it reached no app.
    res.ok = min(res.sipp_ok, res.app_complete)
    res.failed = res.attempted - res.ok
    if res.sipp_rc not in (0, None) and not res.failed:
        res.reasons.append(f"SIPp exit code {res.sipp_rc}")
        res.failed = max(res.failed, 1)

    # -- CPU and memory
    busy, total = m1[0] - m0[0], m1[1] - m0[1]
    res.cpu_pct = 100 * busy / max(1e-9, total)
    res.cpu_peak_pct = max((s.busy_pct for s in sampler.samples), default=0.0)
    if len(invites) > 1:  # while SIPp was still placing calls: the loaded part of the run
        loaded = [s.busy_pct for s in sampler.samples if invites[0] + 1 <= s.wall <= invites[-1]]
        if loaded:
            res.cpu_loaded_pct = statistics.mean(loaded)
    res.node_cpu_share = (node1 - node0) / max(1e-9, busy)
    split = split1 - split0
    split["other processes"] = max(0.0, busy - sum(split.values()))
    res.cpu_split = {k: 100 * v / max(1e-9, total) for k, v in split.most_common()}
    res.worker_threads = {
        k: 100 * v / max(1e-9, total) for k, v in (threads1 - threads0).most_common() if v > 0
    }
    if call_seconds > 0:
        res.cpu_ms_per_call_s = busy * 1000 / call_seconds
        res.node_cpu_ms_per_call_s = (node1 - node0) * 1000 / call_seconds
    res.rss_mb = max((s.rss_mb for s in sampler.samples), default=0.0)
    res.pss_mb = sampler.pss_mb
    res.rss_per_call_mb = res.rss_mb / level
    res.pss_per_call_mb = res.pss_mb / level
    (work / "samples.json").write_text(json.dumps([s.__dict__ for s in sampler.samples]))
    print(f"   {capacity_report.fmt_row(res)}", flush=True)
    print(
        f"   SIPp {sipp_wall:.0f}s rc={res.sipp_rc}; app {res.app_kinds}; events {res.events}",
        flush=True,
    )
    print(
        "   worker threads (% of the machine): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res.worker_threads.items()),
        flush=True,
    )
    print(
        "   CPU by role (% of the machine): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res.cpu_split.items()),
        flush=True,
    )
    if res.metrics:
        print(f"   node's own view: {res.metrics}", flush=True)
    for line in res.profile:
        print(f"   {line}", flush=True)
    for r in res.reasons:
        print(f"   ! {r}", flush=True)
    return res, msgs


async def run_level(
    level: int, kind: str, args: argparse.Namespace, peer: Peer, base: Path
) -> LevelResult:
    drive = Drive(kind, level, level, 2 * level, args.cps)
    workers = workers_for(level, args)
    try:
        res, _ = await run_node(drive, workers, args, peer, base)
    except RuntimeError as e:  # the node did not start: the level failed, the sitting goes on
        print(f"   ! {e}", flush=True)
        why = str(e).splitlines()[0]
        calls = 2 * level
        res = LevelResult(level, workers, kind, args.cps, attempted=calls, failed=calls)
        res.reasons.append(why)
    return res


async def sweep(levels: list[int], run: Callable[[int, str], Awaitable[int]]) -> None:
    """Run the levels in order (run -> failed calls); at the first that fails, one more level
    halfway (to a multiple of BISECT_STEP) between the last good level and it, and stop."""
    good = 0
    for lv in sorted(levels):
        if await run(lv, "sweep") == 0:
            good = lv
            continue
        mid = good + BISECT_STEP * round((lv - good) / 2 / BISECT_STEP)
        if good < mid < lv:
            await run(mid, "bisect")
        return


# ------------------------------------------------------------------------ overload


async def run_overload(
    cap: int, call_s: float, args: argparse.Namespace, peer: Peer, base: Path
) -> OverloadResult:
    """1.5 C offered to a node sized for C: `-l 1.5C`, at the sweep's rate or faster if that
    cannot reach 1.5 C concurrent calls of `call_s`, for 4 C calls."""
    offered = math.ceil(OVERLOAD * cap)
    rate = args.overload_cps or max(args.cps, math.ceil(offered / call_s))
    drive = Drive("overload", offered, offered, args.overload_calls or 4 * cap, rate)
    run, msgs = await run_node(drive, workers_for(cap, args), args, peer, base)
    o = OverloadResult(capacity=cap, offered=offered, run=run)
    calls = [c for c in msgs if "invite" in c]
    o.invites = len(calls)
    answered = [c for c in calls if "200" in c]
    o.answered = len(answered)
    refused = [c for c in calls if "200" not in c and c["codes"]]
    o.refused = dict(Counter(c["codes"][0] for c in refused).most_common())
    o.refused_retry_after = sum(1 for c in refused if c.get("retry_after"))
    o.unanswered = o.invites - o.answered - len(refused)
    o.answered_ok = min(sum(1 for c in answered if "bye" in c), run.app_complete, run.sipp_ok)
    o.answered_failed = o.answered - o.answered_ok
    o.answered_setup_p99 = run.setup_p99
    print(f"   overload: {capacity_report.overload_line(o)}", flush=True)
    return o


# ------------------------------------------------------------------------ sustained rate


def memory(node: proc.Node) -> tuple[float, float]:
    """(RSS, PSS) MB of the node's tree now."""
    members = list(node.members().values())
    return proc.rss_mb(members), proc.pss_mb(members)


async def run_sustain(
    cap: int, level: int, call_s: float, args: argparse.Namespace, peer: Peer, base: Path
) -> SustainResult:
    """level / call_s calls per second for --sustain-s to a node sized for C (SIPp -l C, no
    -m), sampling the node every 10 s."""
    rate = round(level / call_s, 1)
    u = SustainResult(capacity=cap, level=level, target_cps=rate, duration_s=args.sustain_s,
                      run=LevelResult(level=level, workers=0))  # fmt: skip

    async def monitor(live: Live) -> None:
        while True:
            await asyncio.sleep(SUSTAIN_EVERY_S - (time.monotonic() - live.t0) % SUSTAIN_EVERY_S)
            t = time.monotonic() - live.t0
            rss, pss = await asyncio.to_thread(memory, live.node)
            text = await fetch_metrics(live.api_base) or ""
            pending = outbox_pending(text)
            if pending is None:
                pending = await asyncio.to_thread(outbox_pending_db, live.storage)
            stat = read_stat(live.work / "stat.csv")
            invites = int(stat[-1].get("TotalCallCreated", 0) or 0) if stat else 0
            s = SustainSample(t, rss, pss, math.nan if pending is None else pending,
                              active_calls(text), invites)  # fmt: skip
            u.samples.append(s)
            print(
                f"   t={t:4.0f}s RSS {rss:6.0f} MB PSS {pss:6.0f} MB outbox pending "
                f"{s.pending:g} live calls {s.live_calls:g} INVITEs {invites}",
                flush=True,
            )

    drive = Drive("sustain", level, cap, 0, rate, args.sustain_s)
    u.run, _ = await run_node(drive, workers_for(cap, args), args, peer, base, monitor)
    # The verdict reads the loaded part only: after the soft stop the live calls drain.
    loaded = [s for s in u.samples if s.t <= args.sustain_s + 1]
    end = max((s.t for s in loaded), default=0.0)
    window = [s for s in loaded if s.t >= end - LEAK_FIT_S]
    if window:
        u.fit_from, u.fit_s = window[0].t, window[-1].t - window[0].t
    u.rss_slope_mb_min = slope_per_min([(s.t, s.rss_mb) for s in window])
    u.pss_slope_mb_min = slope_per_min([(s.t, s.pss_mb) for s in window])
    # Pending rows come and go with each delivery round: the window's first and last 30 s
    # (medians of 3 samples) against each other, not two single samples.
    pend = [s.pending for s in window if not math.isnan(s.pending)]
    if pend:
        u.pending_start, u.pending_end = statistics.median(pend[:3]), statistics.median(pend[-3:])
        u.pending_max = max(pend)
    print(f"   sustain: {capacity_report.sustain_line(u)}", flush=True)
    return u


# ------------------------------------------------------------------------ the ceiling


_CEIL = re.compile(
    r"workers=(\d+) concurrent=(\d+) ok=(\d+) failed=(\d+) cpu_busy=([\d.]+)% "
    r"invite_200_mean_ms=([\d.]+)"
)


async def run_ceiling(workers: int, cps: int, base: Path) -> CeilingResult:
    level = workers * CEILING_CALLS_PER_WORKER
    res = CeilingResult(level=level, workers=workers)
    work = base / f"ceiling-{workers}"
    work.mkdir(parents=True)
    res.cmd = ["bash", str(CEILING), str(workers), str(cps), sys.executable]
    print(
        f"\n== {since_start()} ceiling: {workers} bare workers x 4 = {level} concurrent calls",
        flush=True,
    )
    env = {**os.environ, "TMPDIR": str(work), "KEEP": "1"}  # run.sh's mktemp lands in our dir
    runsh = await asyncio.create_subprocess_exec(
        *res.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    peak = 0.0
    # Bare workers' threads while SIPp runs: when SIPp appears, and the last 0.5 s sample
    # with SIPp alive.
    first: tuple[float, Counter[str], float] | None = None
    last: tuple[float, Counter[str], float] | None = None

    def members() -> list[psutil.Process]:
        """run.sh's tree (bare workers, SIPp) and Kamailio (daemonized, its config in work)."""
        return list(proc.tree({runsh.pid} | proc.pids_mentioning(str(work))).values())

    async def sample() -> None:
        nonlocal peak, first, last
        bare: list[psutil.Process] = []
        sipp_pid = 0
        n = 0
        while True:
            await asyncio.sleep(0.5)
            n += 1
            if not sipp_pid:
                ps = members()
                if found := [p.pid for p in ps if "carrier_call.xml" in proc.cmdline(p)]:
                    sipp_pid = min(found)
                    bare = [p for p in ps if "bare_worker.py" in proc.cmdline(p)]
                    first = (time.monotonic(), proc.thread_split(bare), proc.machine_cpu()[1])
            elif proc.alive(sipp_pid):
                last = (time.monotonic(), proc.thread_split(bare), proc.machine_cpu()[1])
            if n % 2 == 0:
                ours = [p for p in members() if p.pid != runsh.pid]
                peak = max(peak, await asyncio.to_thread(proc.rss_mb, ours))

    sampler = asyncio.create_task(sample())
    out, _ = await runsh.communicate()
    sampler.cancel()
    res.rss_mb = peak
    if first and last and last[2] > first[2]:
        res.sipp_s = last[0] - first[0]
        res.worker_threads = {
            k: 100 * v / (last[2] - first[2])
            for k, v in (last[1] - first[1]).most_common()
            if v > 0
        }
    text = out.decode(errors="replace")
    res.line = text.strip().splitlines()[-1] if text.strip() else ""
    if m := _CEIL.search(text):
        res.ok, res.failed = int(m.group(3)), int(m.group(4))
        res.cpu_pct, res.setup_mean = float(m.group(5)), float(m.group(6))
    print(f"   {res.line}  (RSS peak {res.rss_mb:.0f} MB)", flush=True)
    wt = ", ".join(f"{k} {v:.1f}" for k, v in res.worker_threads.items())
    print(f"   bare worker threads (% of the machine, while SIPp ran): {wt}", flush=True)
    return res


# ------------------------------------------------------------------------ main


async def amain(args: argparse.Namespace, base: Path, s: Sitting) -> None:
    peer = Peer()
    await peer.start()
    try:
        await gateway_runs(args, peer, base, s)
    finally:
        await peer.stop()


async def gateway_runs(args: argparse.Namespace, peer: Peer, base: Path, s: Sitting) -> None:
    special = args.overload_only or args.sustain_only

    async def level(lv: int, kind: str) -> int:
        s.levels.append(await run_level(lv, kind, args, peer, base))
        return s.levels[-1].failed

    if not (args.ceiling_only or special):
        if args.all_levels:
            for lv in args.level_list:
                await level(lv, "sweep")
        else:
            await sweep(args.level_list, level)
    if not (args.no_ceiling or special):
        await ceiling_runs(args, base, s)
    cap = args.capacity or capacity([(r.level, r.failed) for r in s.levels])
    if not cap:
        if special or not args.ceiling_only:
            print("no capacity found (every level failed): no fractions/overload/sustain")
        return
    if not (args.no_fractions or special or args.ceiling_only):
        done = {r.level for r in s.levels}
        for frac in (0.5, 0.8):
            lv = max(1, round(cap * frac))
            if lv not in done:
                await level(lv, "fraction")
                done.add(lv)
    # Call length (200 -> BYE) at capacity when measured: the rates below aim at concurrency.
    at_cap = [r.call_s_p50 for r in s.levels if r.level == cap and not math.isnan(r.call_s_p50)]
    call_s = at_cap[0] + 0.05 if at_cap else CALL_S  # + INVITE -> 200 and the BYE's answer
    full = not (special or args.ceiling_only)
    if args.overload_only or (args.overload and full):
        try:
            s.overload = await run_overload(cap, call_s, args, peer, base)
        except RuntimeError as e:  # the node did not start
            print(f"   ! overload run: {e}", flush=True)
    if args.sustain_only or (args.sustain_s > 0 and full):
        sustain_level = args.sustain_level or max(1, round(SUSTAIN_FRACTION * cap))
        try:
            s.sustain = await run_sustain(cap, sustain_level, call_s, args, peer, base)
        except RuntimeError as e:
            print(f"   ! sustained run: {e}", flush=True)


async def ceiling_runs(args: argparse.Namespace, base: Path, s: Sitting) -> None:
    if os.geteuid() != 0:
        print("ceiling skipped: run.sh needs root (SIPp's pcap play)", file=sys.stderr)
    elif not args.ceiling_found:
        print(f"ceiling skipped: {CEILING} not found", file=sys.stderr)
    elif args.ceiling_workers:
        s.ceilings.append(await run_ceiling(args.ceiling_workers, args.ceiling_cps, base))
    else:

        async def one(lv: int, kind: str) -> int:
            n = math.ceil(lv / CEILING_CALLS_PER_WORKER)
            if any(c.workers == n for c in s.ceilings):
                return next(c.failed for c in s.ceilings if c.workers == n)
            s.ceilings.append(await run_ceiling(n, args.ceiling_cps, base))
            return s.ceilings[-1].failed

        if args.all_levels:
            for lv in args.level_list:
                await one(lv, "sweep")
        else:
            await sweep(args.level_list, one)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--levels", default="250,300,350,400,450", help="concurrent calls to try")
    ap.add_argument(
        "--all-levels",
        action="store_true",
        help="run every level (default: stop at the first with a failed call, bisect once)",
    )
    ap.add_argument("--cps", type=int, default=50, help="SIPp call rate (-r), default 50")
    ap.add_argument(
        "--ceiling-workers",
        type=int,
        default=0,
        help="run the bare ceiling once with N workers (4N calls) instead of at every level",
    )
    ap.add_argument("--ceiling-cps", type=int, default=0, help="ceiling's rate (default --cps)")
    ap.add_argument("--quick", action="store_true", help="one level of 30 calls: a smoke test")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the bare ceiling runs")
    ap.add_argument(
        "--ceiling-only", action="store_true", help="only the bare ceiling, at --levels"
    )
    ap.add_argument(
        "--no-fractions",
        action="store_true",
        help="skip the extra runs at 50%% and 80%% of the capacity found",
    )
    ap.add_argument(
        "--no-overload",
        dest="overload",
        action="store_false",
        help="skip the overload run (1.5x capacity offered to a node sized for the capacity)",
    )
    ap.add_argument(
        "--overload-only",
        action="store_true",
        help="only the overload run, at --capacity C (no sweep, no ceiling)",
    )
    ap.add_argument(
        "--overload-cps",
        type=float,
        default=0,
        help="overload run's rate (default: --cps, or faster if that cannot reach 1.5 C "
        f"concurrent {CALL_S} s calls)",
    )
    ap.add_argument(
        "--overload-calls", type=int, default=0, help="overload run's calls (default 4 C)"
    )
    ap.add_argument(
        "--sustain-s",
        type=float,
        default=None,
        help="sustained-rate run's length in seconds (default 300; 0 skips it; --quick: 0)",
    )
    ap.add_argument(
        "--sustain-only",
        action="store_true",
        help="only the sustained-rate run (at --sustain-level, node sized for --capacity)",
    )
    ap.add_argument(
        "--sustain-level",
        type=int,
        default=0,
        help="concurrent calls the sustained run aims at (default 0.8 C; its rate is this / "
        f"{CALL_S} s)",
    )
    ap.add_argument(
        "--capacity",
        type=int,
        default=0,
        help="take this as the capacity C instead of the sweep's (for --overload-only, "
        "--sustain-only; with --sustain-only it defaults to --sustain-level / 0.8)",
    )
    ap.add_argument(
        "--headroom",
        type=float,
        default=0.0,
        help="extra workers, a fraction of ceil(C / admitted calls per worker) (default 0: "
        "dispatch is load-aware; 0.2 was needed with round robin + 503 failover)",
    )
    ap.add_argument(
        "--front",
        choices=("managed", "off"),
        default="managed",
        help="kamailio.mode; 'off' = one worker, no Kamailio (development)",
    )
    ap.add_argument(
        "--calls-per-worker",
        type=int,
        default=CALLS_PER_WORKER,
        help=f"workers.calls_per_worker (default {CALLS_PER_WORKER})",
    )
    ap.add_argument(
        "--reserved-slots",
        type=int,
        default=0,
        help="workers.reserved_slots (default 0: 4 calls admitted per worker; 1 = what-if: "
        "a slot kept for dial, 3 per worker)",
    )
    ap.add_argument("--kamailio-children", type=int, default=4)
    ap.add_argument(
        "--settle",
        type=float,
        default=6.0,
        help="seconds between ready and the first call (idle CPU measured)",
    )
    ap.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for ready, plus 1.5 s per worker",
    )
    ap.add_argument("--rtp-port", type=int, default=21000, help="gateway's first RTP port")
    ap.add_argument("--worker-port", type=int, default=26000, help="first worker SIP port")
    ap.add_argument(
        "--sipp-media-port",
        type=int,
        default=10000,
        help="SIPp's -mp: pcap calls use ports from here to +10000 (defaults keep clear of the "
        "ephemeral range and of the test suite's RTP ports)",
    )
    ap.add_argument("--plot", type=Path, default=None, help=f"PNG path (default {rel(str(PLOT))})")
    ap.add_argument("--out", type=Path, default=None, help="markdown report path")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the supervisor and a worker, perf a worker, during each SIPp run "
        "(changes the figures a little: use for analysis, not for the table)",
    )
    ap.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="no run: rewrite the report and plot from a run's saved figures (the .json "
        "written next to its report)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, SIPp traces)")
    args = ap.parse_args()
    if args.quick:
        args.levels = "30"
        args.no_fractions = True
        if not args.ceiling_workers:
            args.ceiling_workers = 8
        args.overload = False
    if args.sustain_s is None:
        args.sustain_s = 0.0 if args.quick and not args.sustain_only else 300.0
    if args.sustain_only and not args.capacity:
        if not args.sustain_level:
            sys.exit("--sustain-only needs --sustain-level N or --capacity C")
        args.capacity = math.ceil(args.sustain_level / SUSTAIN_FRACTION)
    if args.overload_only and not args.capacity:
        sys.exit("--overload-only needs --capacity C")
    args.level_list = [int(x) for x in args.levels.split(",") if x.strip()]
    args.ceiling_cps = args.ceiling_cps or args.cps
    args.ceiling_found = CEILING.exists()
    if args.front == "off" and max(args.level_list) > args.calls_per_worker - args.reserved_slots:
        sys.exit("--front off runs one worker: levels of at most its admitted calls")
    for tool in ("sipp", "kamailio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    if os.geteuid() != 0:
        print(
            "warning: SIPp's pcap play (the digit and the caller's audio) needs root or "
            "CAP_NET_RAW",
            file=sys.stderr,
        )

    base: Path | None = None
    if args.render:
        sitting = load(args.render, args)
    else:
        sitting = Sitting(datetime.now(), 0.0)
        args.argv = sys.argv[1:]
        args.load_before = os.getloadavg()[0]
        args.commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        base = Path(tempfile.mkdtemp(prefix="sautikit-capacity-"))
        t0 = time.monotonic()
        try:
            asyncio.run(amain(args, base, sitting))
        except (Exception, KeyboardInterrupt):  # report what was measured before it broke
            traceback.print_exc()
            print("the sitting stopped early: the report has what was measured", flush=True)
        sitting.wall_s = time.monotonic() - t0

    started = sitting.started
    suffix = "-quick" if args.quick else ""
    if args.overload_only or args.sustain_only:
        suffix = "-overload" if args.overload_only else "-sustain"
    quick_png = RESULTS / f"capacity-{started:%Y-%m-%d}{suffix}.png"
    plot_path = args.plot or (quick_png if suffix else PLOT)
    plot_note = capacity_report.plot(sitting, plot_path)
    text = capacity_report.report(args, sitting, plot_note, Path(__file__))
    out = args.out or RESULTS / f"capacity-{started:%Y-%m-%d}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if base is not None:
        save(out.with_suffix(".json"), args, sitting)
    print("\n" + text)
    print(f"report: {rel(str(out))} (figures also in {rel(str(out.with_suffix('.json')))})")
    bad = (
        any(r.failed for r in sitting.levels)
        or (sitting.overload is not None and sitting.overload.answered_failed > 0)
        or (sitting.sustain is not None and sitting.sustain.run.failed > 0)
    )
    if base is None:
        pass
    elif args.keep or bad:
        print(f"work dir kept: {base} (gateway.log, SIPp traces per level)")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
