#!/usr/bin/env python3
"""Capacity of one gateway node on this machine: an IVR call mix through Kamailio, under SIPp.

For each concurrency level C it starts a fresh node and drives it, all on 127.0.0.1, all real:
  * a voice app + events receiver (aiohttp, in this process). First request of a call ->
    say (about 2.8 s of espeak-ng English) + getDigits (numDigits 1, timeout 5); the `Digits`
    request -> record (maxLength 5, timeout 0 = no silence stop, playBeep); the record result
    -> hangup. Every request and every event is signature-checked and counted per call.
  * the gateway, `python -m gateway.cli run --config FILE`: `[kamailio] mode = "managed"` (the
    node runs Kamailio on `[sip] listen` and dispatches to its workers), `[workers] count =
    ceil(C / 3) + 20 %` (round robin + 503 failover runs out of Kamailio branches with less),
    `calls_per_worker = 4`, `reserved_slots = 1` (so each worker admits
    3 inbound calls and keeps one slot for a dial leg), events to the receiver through
    `[control_plane] events_url` (so event delivery is part of the load), storage in a temp dir.
  * SIPp as the carrier through Kamailio, bench/sipp/ivr_carrier.xml: `-l C -m 2C -r CPS`;
    the caller presses 1 (RFC 4733 pcap) after the prompt and speaks (g711a.pcap) into the
    recording, then answers the gateway's BYE.
While SIPp runs it samples, every second, the whole machine's CPU (/proc/stat, busy =
user+nice+system over user+nice+system+idle+iowait, as the ceiling's run.sh counts it) and the
RSS of the node's process tree (supervisor, workers, Kamailio) from /proc; around the run, the
CPU of each process role and of each worker thread (asyncio loop, pjmedia clock and media).
INVITE -> 200 per call comes from SIPp's message trace, as in bench/setup_time.py.

A call counts as failed if SIPp failed it, or the voice app did not see all three requests
(start, Digits=1, record result) for it, or its `call.completed` event never arrived.

Then, in the same sitting, it runs the stack's bare ceiling (`/work/shared/bench/ceiling/run.sh
N CPS PYTHON`: N bare pjsua2 workers x 4 calls behind Kamailio, same SIPp rate) at the same
levels (N = ceil(C / 4)), and prints gateway capacity / ceiling capacity, capacity being the
highest level run with 0 failed calls. Then two more levels at 50 % and 80 % of the gateway's
capacity (--no-fractions to skip).

Writes the table and the commands to stdout and bench/results/capacity-<date>.md, and plots
INVITE->200 p99, CPU and memory against concurrent calls into docs/capacity.png (matplotlib,
if installed; the plot is skipped otherwise); every figure also goes to a .json next to the
report (--render FILE.json redoes report and plot from it).

usage: .venv/bin/python bench/capacity.py [--levels 100,200,300,400,450] [--cps 50]
           [--ceiling-workers N] [--quick] [--no-ceiling | --ceiling-only] [--no-fractions]
           [--headroom 0.2] [--reserved-slots 1] [--profile] [--render FILE.json] [--keep]
Needs root (SIPp's pcap play). --quick: one level of 30 calls and a 32-call ceiling, ~1 min.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.demo import free_port  # noqa: E402
from gateway.events.signing import verify  # noqa: E402

SCENARIO = ROOT / "bench" / "sipp" / "ivr_carrier.xml"
CEILING = Path("/work/shared/bench/ceiling/run.sh")
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "capacity.png"
NUMBER = "+254700000001"
CALLS_PER_WORKER = 4
RESERVED_SLOTS = 1  # default: one slot per worker kept for a dial leg, so 3 admitted
CEILING_CALLS_PER_WORKER = 4  # bare workers keep no slot for dial legs
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
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
FINAL_EVENTS = ("call.completed", "call.failed")
P99_GOAL_MS = 150.0


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


# ------------------------------------------------------------------------ /proc sampling


def read_procs() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, utime+stime ticks, RSS pages), for every process now alive."""
    out: dict[int, tuple[int, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(b")") + 2 :].split()
        out[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[21]))
    return out


def descendants(procs: dict[int, tuple[int, int, int]], roots: set[int]) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    seen, todo = set(), [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(kids.get(pid, []))
    return seen


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return False
    return s[s.rfind(b")") + 2 : s.rfind(b")") + 3] != b"Z"


def pids_mentioning(text: str) -> set[int]:
    """Processes whose command line contains `text` (Kamailio started from our work dir)."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.add(int(name))
            except OSError:
                pass
    return found


_roles: dict[int, str] = {}


def role(pid: int, roots: set[int]) -> str:
    """supervisor / worker / kamailio / other, from the command line (cached per pid)."""
    if pid in roots:
        return "supervisor"
    if pid not in _roles:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            cmd = b""
        _roles[pid] = (
            "worker"
            if b"gateway.workers.worker" in cmd
            else "kamailio"
            if b"kamailio" in cmd
            else "node other"
        )
    return _roles[pid]


def thread_split(pids: set[int]) -> Counter[str]:
    """CPU ticks of these processes' threads by thread: `main` (the thread that runs Python's
    asyncio loop in a gateway worker, libHandleEvents in a bare one), `python` (other Python
    threads: the gateway's pjsua-pump), pjmedia's `clock` and `media`, and `exited` (threads
    gone: process total minus its live threads)."""
    out: Counter[str] = Counter()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                s = f.read()
            rest = s[s.rfind(b")") + 2 :].split()
            total = int(rest[11]) + int(rest[12])
            seen = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    t = f.read()
                comm = t[t.find(b"(") + 1 : t.rfind(b")")].decode(errors="replace")
                trest = t[t.rfind(b")") + 2 :].split()
                ticks = int(trest[11]) + int(trest[12])
                seen += ticks
                out["main" if int(tid) == pid else comm] += ticks
            out["exited"] += max(0, total - seen)
        except OSError:
            continue
    return out


def cpu_times() -> tuple[int, int]:
    """(busy, total) ticks of the whole machine, counted as the ceiling's run.sh does."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:6]]
    user, nice, system, idle, iowait = v
    busy = user + nice + system
    return busy, busy + idle + iowait


def pss_kb(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


@dataclass
class Sample:
    t: float
    wall: float
    busy_pct: float  # whole machine, this second
    rss_mb: float  # the node's tree
    procs: int


class Sampler:
    """Every second: machine CPU busy and the RSS of the process tree under `roots`."""

    def __init__(self, roots: set[int], extra: set[int] | None = None) -> None:
        self.roots = roots
        self.extra = extra or set()
        self.samples: list[Sample] = []
        self.pss_mb = 0.0
        self.children_label = "sipp"
        self._task: asyncio.Task[None] | None = None

    def members(self, procs: dict[int, tuple[int, int, int]]) -> set[int]:
        return descendants(procs, self.roots | self.extra)

    def snapshot(self) -> tuple[int, int, int]:
        """(machine busy ticks, machine total ticks, tree CPU ticks)."""
        busy, total = cpu_times()
        procs = read_procs()
        return busy, total, sum(procs[p][1] for p in self.members(procs))

    def split(self) -> Counter[str]:
        """CPU ticks so far of the tree's processes by role, plus this process and its reaped
        children (SIPp, once it has exited)."""
        procs = read_procs()
        out: Counter[str] = Counter()
        for pid in self.members(procs):
            out[role(pid, self.roots)] += procs[pid][1]
        me, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        out["bench app"] = round((me.ru_utime + me.ru_stime) * HZ)
        # Reaped children during the SIPp run: SIPp (and py-spy/perf with --profile).
        out[self.children_label] = round((kids.ru_utime + kids.ru_stime) * HZ)
        return out

    def worker_threads(self) -> Counter[str]:
        procs = read_procs()
        return thread_split({p for p in self.members(procs) if role(p, self.roots) == "worker"})

    async def _run(self) -> None:
        busy0, total0 = cpu_times()
        n = 0
        while True:
            await asyncio.sleep(1.0)
            busy, total = cpu_times()
            procs = read_procs()
            tree = self.members(procs)
            rss = sum(procs[p][2] for p in tree) * PAGE / 1e6
            pct = 100 * (busy - busy0) / max(1, total - total0)
            self.samples.append(Sample(time.monotonic(), time.time(), pct, rss, len(tree)))
            busy0, total0 = busy, total
            n += 1
            if n % 5 == 0:  # PSS counts shared pages once; dearer to read, so less often
                self.pss_mb = max(self.pss_mb, await asyncio.to_thread(pss_kb, tree) / 1000)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ------------------------------------------------------------------------ SIPp output


_STAMP = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$")


def read_messages(work: Path) -> dict[str, dict[str, Any]]:
    """Per Call-ID, from SIPp's *_messages.log (wall-clock stamps in us): first INVITE sent,
    first 200 to it received, first BYE received, and any other final INVITE response codes."""
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
                if sep and k.strip().lower() in ("call-id", "cseq"):
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
    args: argparse.Namespace, work: Path, sampler: Sampler, calls: int
) -> list[Profiler]:
    """py-spy on the supervisor and on a few workers (Python view, summed), perf on one worker
    (native view by thread) and on the whole machine, for about the length of the SIPp run."""
    pyspy = Path(sys.executable).parent / "py-spy"
    procs = read_procs()
    members = sorted(sampler.members(procs))
    workers = [p for p in members if role(p, sampler.roots) == "worker"]
    sup = next(iter(sampler.roots))
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
        pid = workers[len(workers) // 2 + 1] if len(workers) > 1 else workers[0]
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
        for proc in p.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.send_signal(signal.SIGINT)
                await proc.wait()
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


# ------------------------------------------------------------------------ one level


async def scrape_metrics(api_base: str) -> dict[str, float]:
    """Means of the node's own setup and voice app fetch histograms, from /metrics."""
    from aiohttp import ClientSession, ClientTimeout

    out: dict[str, float] = {}
    try:
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:
            async with http.get(f"{api_base}/metrics") as r:
                text = await r.text()
    except Exception as e:  # the figures are a cross-check only
        print(f"   (no /metrics: {e})", flush=True)
        return out
    sums: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(sautikit_\w+?)_(sum|count)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and (m.group(3) or "").find("error") < 0:
            key = f"{m.group(1)}_{m.group(2)}"
            sums[key] = sums.get(key, 0.0) + float(m.group(4))
    for name in ("sautikit_call_setup_seconds", "sautikit_callback_fetch_seconds"):
        if sums.get(f"{name}_count"):
            out[name + "_mean_ms"] = 1000 * sums[f"{name}_sum"] / sums[f"{name}_count"]
            out[name + "_count"] = sums[f"{name}_count"]
    return out


@dataclass
class LevelResult:
    level: int
    workers: int
    attempted: int = 0
    ok: int = 0
    failed: int = 0
    sipp_ok: int = 0
    sipp_failed: int = 0
    sipp_rc: int | None = None
    app_complete: int = 0
    app_kinds: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    peak_calls: int = 0
    cps: float = 0.0  # INVITEs sent per second over the run
    ramp_cps: float = 0.0  # ... over the first C calls (before the -l limit holds SIPp back)
    setup_p50: float = float("nan")
    setup_p99: float = float("nan")
    setup_max: float = float("nan")
    call_s_p50: float = float("nan")
    cpu_pct: float = 0.0
    cpu_peak_pct: float = 0.0
    cpu_loaded_pct: float = float("nan")  # mean of 1 s samples from first to last INVITE
    idle_cpu_pct: float = 0.0
    cpu_ms_per_call_s: float = float("nan")
    node_cpu_ms_per_call_s: float = float("nan")
    node_cpu_share: float = 0.0  # of all busy CPU during the run
    rss_mb: float = 0.0
    rss_idle_mb: float = 0.0
    pss_mb: float = 0.0
    rss_per_call_mb: float = 0.0
    ready_s: float = 0.0
    final_lag_p99: float = float("nan")
    app_handling_p99: float = float("nan")
    recording_s_p50: float = float("nan")
    bad_signatures: int = 0
    reasons: list[str] = field(default_factory=list)
    cpu_split: dict[str, float] = field(default_factory=dict)  # % of the machine, by role
    metrics: dict[str, float] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)
    worker_threads: dict[str, float] = field(default_factory=dict)  # % of the machine
    sipp_cmd: list[str] = field(default_factory=list)
    work: str = ""


def write_config(
    work: Path, peer: Peer, level: int, workers: int, args: argparse.Namespace
) -> tuple[Path, int, str]:
    sip_port, api_port = free_port(both=True), free_port()
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
rtp_port_start = {args.rtp_port}
rtp_ports_per_worker = 20
[workers]
count = {workers}
calls_per_worker = {CALLS_PER_WORKER}
reserved_slots = {args.reserved_slots}
host = "127.0.0.1"
sip_port_start = {args.worker_port}
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


def start_gateway(config: Path, log: Path, timeout: float) -> tuple[subprocess.Popen[bytes], float]:
    out = log.open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,  # its own process group: stopped as a whole, and only it
    )
    out.close()
    while time.monotonic() - t0 < timeout:
        if b"sautikit-gateway ready" in log.read_bytes():
            return proc, time.monotonic() - t0
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop_gateway(proc)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(
        f"gateway not ready after {time.monotonic() - t0:.0f}s "
        f"(exit {proc.returncode}); log tail:\n{tail}"
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


async def run_level(level: int, args: argparse.Namespace, peer: Peer, base: Path) -> LevelResult:
    admit = CALLS_PER_WORKER - args.reserved_slots
    workers = 1 if args.front == "off" else math.ceil(level / admit)
    if args.front != "off":
        workers += max(1, math.ceil(workers * args.headroom))
    res = LevelResult(level=level, workers=workers)
    work = base / f"level-{level}"
    work.mkdir(parents=True)
    res.work = str(work)
    peer.reset()
    config, sip_port, api_base = write_config(work, peer, level, workers, args)
    print(
        f"\n== level {level}: {workers} worker(s) x {admit} admitted calls, front {args.front}",
        flush=True,
    )
    gw, res.ready_s = await asyncio.to_thread(
        start_gateway, config, work / "gateway.log", args.ready_timeout + 1.5 * workers
    )
    print(f"   node ready in {res.ready_s:.1f}s (pid {gw.pid})", flush=True)
    calls = 2 * level
    res.attempted = calls
    try:
        sampler = Sampler({gw.pid}, pids_mentioning(str(work)) - {os.getpid()})
        # Idle cost (and time for the front's first OPTIONS probes of every worker).
        b0, t0, _ = sampler.snapshot()
        await asyncio.sleep(args.settle)
        b1, t1, _ = sampler.snapshot()
        res.idle_cpu_pct = 100 * (b1 - b0) / max(1, t1 - t0)
        procs = read_procs()
        res.rss_idle_mb = sum(procs[p][2] for p in sampler.members(procs)) * PAGE / 1e6
        sipp_cmd = [
            "sipp", "-sf", str(SCENARIO), f"127.0.0.1:{sip_port}", "-s", NUMBER,
            "-m", str(calls), "-l", str(level), "-r", str(args.cps),
            "-i", "127.0.0.1", "-p", str(free_port(both=True)), "-mp", str(args.sipp_media_port),
            "-trace_msg", "-trace_rtt", "-rtt_freq", "1", "-trace_err",
            "-trace_stat", "-stf", "stat.csv", "-fd", "1",
            "-timeout", str(int(calls / args.cps + 120)), "-timeout_error", "-nostdin",
        ]  # fmt: skip
        res.sipp_cmd = sipp_cmd
        busy0, total0, node0 = sampler.snapshot()
        split0 = sampler.split()
        threads0 = sampler.worker_threads()
        sampler.start()
        profilers = await start_profilers(args, work, sampler, calls) if args.profile else []
        if profilers:
            split0["sipp + profilers"] = split0.pop("sipp")
            sampler.children_label = "sipp + profilers"
        t_start = time.monotonic()
        with (work / "sipp.out").open("wb") as out:
            sipp = await asyncio.create_subprocess_exec(
                *sipp_cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT
            )
            res.sipp_rc = await sipp.wait()
        sipp_wall = time.monotonic() - t_start
        if profilers:
            res.profile = await finish_profilers(profilers)
        await sampler.stop()
        busy1, total1, node1 = sampler.snapshot()
        split1 = sampler.split()
        threads1 = sampler.worker_threads()
        # Every call that reached the app should get its final event; wait for stragglers.
        deadline = time.monotonic() + 30 + level / 20
        while peer.finished_calls() < len(peer.calls) and time.monotonic() < deadline:
            peer.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.changed.wait(), 0.5)
        res.metrics = await scrape_metrics(api_base)
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
    res.ok = min(res.sipp_ok, res.app_complete)
    res.failed = calls - res.ok
    if res.sipp_rc not in (0, None) and not res.failed:
        res.reasons.append(f"SIPp exit code {res.sipp_rc}")
        res.failed = max(res.failed, 1)

    # -- CPU and memory
    busy, total = busy1 - busy0, total1 - total0
    res.cpu_pct = 100 * busy / max(1, total)
    res.cpu_peak_pct = max((s.busy_pct for s in sampler.samples), default=0.0)
    if len(invites) > 1:  # while SIPp was still placing calls: the loaded part of the run
        loaded = [s.busy_pct for s in sampler.samples if invites[0] + 1 <= s.wall <= invites[-1]]
        if loaded:
            res.cpu_loaded_pct = statistics.mean(loaded)
    res.node_cpu_share = (node1 - node0) / max(1, busy)
    split = split1 - split0
    split["other processes"] = max(0, busy - sum(split.values()))
    res.cpu_split = {k: 100 * v / max(1, total) for k, v in split.most_common()}
    res.worker_threads = {
        k: 100 * v / max(1, total) for k, v in (threads1 - threads0).most_common() if v
    }
    if call_seconds > 0:
        res.cpu_ms_per_call_s = busy * 1000 / HZ / call_seconds
        res.node_cpu_ms_per_call_s = (node1 - node0) * 1000 / HZ / call_seconds
    res.rss_mb = max((s.rss_mb for s in sampler.samples), default=0.0)
    res.pss_mb = sampler.pss_mb
    res.rss_per_call_mb = res.rss_mb / level
    (work / "samples.json").write_text(json.dumps([s.__dict__ for s in sampler.samples]))
    print(f"   {fmt_row(res)}", flush=True)
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
    return res


# ------------------------------------------------------------------------ the ceiling


@dataclass
class CeilingResult:
    level: int
    workers: int
    ok: int = 0
    failed: int = -1
    cpu_pct: float = float("nan")
    setup_mean: float = float("nan")
    rss_mb: float = 0.0
    worker_threads: dict[str, float] = field(default_factory=dict)  # % of the machine
    sipp_s: float = 0.0
    line: str = ""
    cmd: list[str] = field(default_factory=list)


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
    print(f"\n== ceiling: {workers} bare workers x 4 = {level} concurrent calls", flush=True)
    env = {**os.environ, "TMPDIR": str(work), "KEEP": "1"}  # run.sh's mktemp lands in our dir
    proc = await asyncio.create_subprocess_exec(
        *res.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    peak = 0.0
    # Bare workers' threads while SIPp runs: when SIPp appears, and the last 0.5 s sample
    # with SIPp alive.
    first: tuple[float, Counter[str], int] | None = None
    last: tuple[float, Counter[str], int] | None = None

    async def sample() -> None:
        nonlocal peak, first, last
        bare: set[int] = set()
        sipp_pid = 0
        n = 0
        while True:
            await asyncio.sleep(0.5)
            n += 1
            if not sipp_pid:
                if found := pids_mentioning("carrier_call.xml") - {os.getpid()}:
                    sipp_pid = min(found)
                    bare = pids_mentioning("bare_worker.py") - {os.getpid()}
                    first = (time.monotonic(), thread_split(bare), cpu_times()[1])
            elif alive(sipp_pid):
                last = (time.monotonic(), thread_split(bare), cpu_times()[1])
            if n % 2 == 0:
                procs = read_procs()
                mine = pids_mentioning("bare_worker.py") | pids_mentioning(str(work))
                mine = (mine & procs.keys()) - {os.getpid()}
                ours = {p for p in mine if procs[p][0] not in mine} - {proc.pid}
                tree = descendants(procs, ours)
                peak = max(peak, sum(procs[p][2] for p in tree) * PAGE / 1e6)

    sampler = asyncio.create_task(sample())
    out, _ = await proc.communicate()
    sampler.cancel()
    res.rss_mb = peak
    if first and last and last[2] > first[2]:
        res.sipp_s = last[0] - first[0]
        res.worker_threads = {
            k: 100 * v / (last[2] - first[2]) for k, v in (last[1] - first[1]).most_common() if v
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


# ------------------------------------------------------------------------ report


def fmt_row(r: LevelResult) -> str:
    return (
        f"level {r.level}: ok {r.ok} failed {r.failed} peak {r.peak_calls} cps {r.cps:.1f} "
        f"INVITE->200 p50 {r.setup_p50:.1f} p99 {r.setup_p99:.1f} ms; CPU {r.cpu_pct:.0f}% "
        f"(peak {r.cpu_peak_pct:.0f}%, {r.cpu_ms_per_call_s:.1f} ms/call-s); "
        f"RSS {r.rss_mb:.0f} MB ({r.rss_per_call_mb:.1f}/call)"
    )


def capacity(levels: list[tuple[int, int]]) -> int:
    """Highest level with 0 failed calls (0 if none)."""
    return max((lv for lv, failed in levels if failed == 0), default=0)


def clean_up_to(levels: list[tuple[int, int]]) -> int:
    """Highest level below which no level failed either (stricter than `capacity`)."""
    best = 0
    for lv, failed in sorted(levels):
        if failed:
            break
        best = lv
    return best


def rel(path: str) -> str:
    here = f"{Path.cwd()}/"
    return os.path.relpath(path) if path.startswith(here) else path


def report(
    args: argparse.Namespace,
    results: list[LevelResult],
    ceilings: list[CeilingResult],
    started: datetime,
    wall: float,
    plot_note: str,
) -> str:
    py, script = rel(sys.executable), rel(str(Path(__file__).absolute()))
    commit = args.commit
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_gb = os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30
    admit = CALLS_PER_WORKER - args.reserved_slots
    L = []
    L.append(f"# Gateway capacity, {started:%Y-%m-%d %H:%M}")
    L.append("")
    L.append(
        f"Commit {commit}, {os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GB, Python "
        f"{platform.python_version()}, load average before the run "
        f"{args.load_before:.2f}; whole run {wall / 60:.1f} min."
    )
    L.append(
        f"IVR mix per call: say (2.8 s) -> getDigits (RFC 4733 '1') -> record 5 s (+0.2 s beep) "
        f"-> hangup; three voice app requests and four events per call, all on loopback. "
        f"SIPp through the node's Kamailio (front `{args.front}`), `-l C -m 2C -r {args.cps}`. "
        f"Workers: `calls_per_worker = {CALLS_PER_WORKER}`, `reserved_slots = "
        f"{args.reserved_slots}`: {admit} admitted per worker, count = ceil(C/{admit}) + "
        f"{args.headroom:.0%} headroom."
    )
    L.append("")
    L.append(
        "| concurrent calls (level / peak seen) | workers | calls ok / failed | "
        "calls/s (first C calls) | "
        "INVITE→200 p50 / p99 ms | CPU busy %: run (while placing calls; peak 1 s; not ours) | "
        "CPU ms per call-second "
        "(node's share) | RSS MB total (idle) | RSS MB per call | PSS MB |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: r.level):
        L.append(
            f"| {r.level} / {r.peak_calls} | {r.workers} | {r.ok} / {r.failed} | {r.cps:.1f} "
            f"({r.ramp_cps:.1f}) | "
            f"{r.setup_p50:.1f} / {r.setup_p99:.1f} | {r.cpu_pct:.0f} ({r.cpu_loaded_pct:.0f}; "
            f"{r.cpu_peak_pct:.0f}; "
            f"{r.cpu_split.get('other processes', 0):.0f}) | "
            f"{r.cpu_ms_per_call_s:.1f} ({r.node_cpu_share:.0%}) | {r.rss_mb:.0f} "
            f"({r.rss_idle_mb:.0f}) | {r.rss_per_call_mb:.1f} | {r.pss_mb:.0f} |"
        )
    cap = capacity([(r.level, r.failed) for r in results])
    L.append("")
    L.append(
        f"**Capacity: {cap} concurrent calls with 0 failed calls** "
        f"(highest level run with none; {admit} admitted per worker)."
    )
    for r in sorted(results, key=lambda r: r.level):
        if r.reasons:
            L.append(f"- level {r.level} failures/notes: " + "; ".join(r.reasons))
    L.append("")
    L.append("Other per-level figures: ")
    for r in sorted(results, key=lambda r: r.level):
        L.append(
            f"- level {r.level}: INVITE→200 max {r.setup_max:.0f} ms; node ready after "
            f"{r.ready_s:.0f} s; idle CPU {r.idle_cpu_pct:.0f}%; call length p50 "
            f"{r.call_s_p50:.1f} s; recording p50 {r.recording_s_p50:.0f} s; call.completed "
            f"delivered p99 {r.final_lag_p99:.0f} ms after it happened; app handling p99 "
            f"{r.app_handling_p99:.2f} ms; voice app requests {r.app_kinds}; events {r.events}"
        )
        L.append(
            "  - worker threads, % of the machine over the SIPp run: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.worker_threads.items())
        )
        L.append(
            "  - CPU by role, % of the machine over the SIPp run: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.cpu_split.items())
        )
        if r.metrics:
            L.append(
                "  - the node's /metrics: setup (INVITE received → 200 sent) mean "
                f"{r.metrics.get('sautikit_call_setup_seconds_mean_ms', float('nan')):.1f} ms, "
                "voice app fetch mean "
                f"{r.metrics.get('sautikit_callback_fetch_seconds_mean_ms', float('nan')):.1f} ms"
            )
    if ceilings:
        L.append("")
        L.append(f"## The bare stack's ceiling, same sitting (`run.sh N {args.ceiling_cps}`)")
        L.append("")
        L.append(
            "| concurrent calls | bare workers | calls ok / failed | CPU busy % | "
            "INVITE→200 mean ms | RSS MB total |"
        )
        L.append("|---|---|---|---|---|---|")
        for c in sorted(ceilings, key=lambda c: c.level):
            L.append(
                f"| {c.level} | {c.workers} | {c.ok} / {c.failed} | {c.cpu_pct:.0f} | "
                f"{c.setup_mean:.0f} | {c.rss_mb:.0f} |"
            )
        ccap = capacity([(c.level, c.failed) for c in ceilings])
        L.append("")
        if args.ceiling_workers:
            L.append(
                f"Ceiling run once at {args.ceiling_workers} workers "
                f"({args.ceiling_workers * 4} calls) and taken as its capacity if it had "
                "0 failures."
            )
        ratio = cap / ccap if ccap else float("nan")
        strict_g = clean_up_to([(r.level, r.failed) for r in results])
        strict_c = clean_up_to([(c.level, c.failed) for c in ceilings])
        top = max((r.level for r in results), default=0)
        ctop = max(c.level for c in ceilings)
        bound = (
            " Neither failed at the highest level it was run at, so both capacities are at "
            "least these figures: the ratio compares the levels run, not two measured limits."
            if cap >= top and ccap >= ctop
            else ""
        )
        L.append(
            f"**Gateway / ceiling capacity = {cap} / {ccap} = {ratio:.2f}** (goal ≥ 0.85).{bound}"
        )
        fast = max(
            (r.level for r in results if r.failed == 0 and r.setup_p99 < P99_GOAL_MS), default=0
        )
        if ccap:
            L.append(
                f"With the INVITE→200 goal too (0 failed and p99 < {P99_GOAL_MS:.0f} ms): "
                f"{fast} / {ccap} = {fast / ccap:.2f}."
            )
        if (strict_g, strict_c) != (cap, ccap) and strict_c:
            L.append(
                f"Counting only levels below which nothing failed either: {strict_g} / "
                f"{strict_c} = {strict_g / strict_c:.2f}."
            )
        by = {c.level: c for c in ceilings}
        for r in sorted(results, key=lambda r: r.level):
            cr = by.get(CEILING_CALLS_PER_WORKER * math.ceil(r.level / CEILING_CALLS_PER_WORKER))
            if cr is None or not cr.cpu_pct > 0:  # also skips NaN: run.sh printed nothing
                continue
            note = (
                f" (the gateway failed {r.failed} calls here; its run was stretched by "
                f"stuck calls, {r.cpu_loaded_pct:.0f}% while SIPp was placing calls)"
                if r.failed
                else ""
            )
            L.append(
                f"- at {r.level} calls: gateway CPU {r.cpu_pct:.0f}% vs bare "
                f"{cr.cpu_pct:.0f}% ({r.cpu_pct / cr.cpu_pct:.1f}x){note}; RSS "
                f"{r.rss_mb:.0f} vs {cr.rss_mb:.0f} MB"
            )
            wt = ", ".join(f"{k} {v:.1f}" for k, v in cr.worker_threads.items())
            L.append(f"  - bare worker threads at {cr.level}, % of the machine: {wt}")
    profiled = [r for r in results if r.profile]
    for r in profiled:
        L.append("")
        L.append(f"### Profile at level {r.level}")
        L.append("")
        L.append("```")
        L.extend(r.profile)
        L.append("```")
    L.append("")
    L.append("## Commands")
    L.append("")
    L.append("```")
    L.append(f"{py} {script} {shlex.join(args.argv)}   # this whole run")
    front = "" if args.front == "managed" else f" --front {args.front}"
    for r in sorted(results, key=lambda r: r.level):
        L.append(
            f"{py} {script} --levels {r.level} --cps {args.cps} --no-ceiling "
            f"--no-fractions{front}   # level {r.level}"
        )
    for c in sorted(ceilings, key=lambda c: c.level):
        L.append(f"{shlex.join(c.cmd)}   # ceiling {c.level}")
    if results:
        top_run = max(results, key=lambda r: r.level)
        L.append(f"# SIPp, as run for level {top_run.level} (in its work dir):")
        L.append(shlex.join(top_run.sipp_cmd))
    L.append("```")
    if plot_note:
        L.append("")
        L.append(plot_note)
    return "\n".join(L) + "\n"


def plot(results: list[LevelResult], ceilings: list[CeilingResult], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot skipped: matplotlib is not installed (pip install matplotlib)."
    rs = sorted(results, key=lambda r: r.level)
    cs = sorted(ceilings, key=lambda c: c.level)
    x = [r.level for r in rs]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.4))
    ax[0].plot(x, [r.setup_p99 for r in rs], "o-", label="p99")
    ax[0].plot(x, [r.setup_p50 for r in rs], "s--", label="p50")
    ax[0].axhline(P99_GOAL_MS, color="red", lw=0.8, ls=":", label="goal: p99 150 ms")
    ax[0].set_yscale("log")
    ax[0].set_title("INVITE→200 (voice app fetch included)")
    ax[0].set_ylabel("ms (log scale)")
    ax[1].plot(x, [r.cpu_loaded_pct for r in rs], "o-", label="gateway, while placing calls")
    ax[1].plot(x, [r.cpu_pct for r in rs], "o:", color="C0", alpha=0.5,
               label="gateway, whole SIPp run")  # fmt: skip
    if cs:
        ax[1].plot([c.level for c in cs], [c.cpu_pct for c in cs], "s--", label="bare ceiling")
    ax[1].set_title("CPU busy, whole machine (2 cores)")
    ax[1].set_ylabel("% of both cores")
    ax[1].set_ylim(0, 100)
    ax[2].plot(x, [r.rss_mb for r in rs], "o-", label="gateway tree RSS")
    if any(r.pss_mb for r in rs):
        ax[2].plot(x, [r.pss_mb for r in rs], "^:", label="gateway tree PSS")
    if cs:
        ax[2].plot([c.level for c in cs], [c.rss_mb for c in cs], "s--", label="bare ceiling RSS")
    ax[2].set_title("Memory")
    ax[2].set_ylabel("MB")
    failed = [r for r in rs if r.failed]
    for a, ys in (
        (ax[0], [r.setup_p99 for r in failed]),
        (ax[1], [r.cpu_loaded_pct for r in failed]),
        (ax[2], [r.rss_mb for r in failed]),
    ):
        if failed:
            a.scatter([r.level for r in failed], ys, marker="x", s=80, color="red", zorder=5,
                      label="level with failed calls")  # fmt: skip
    for a in ax:
        a.set_xlabel("concurrent calls")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("Sautikit gateway node, IVR mix (say → getDigits → record 5 s → hangup)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"Plot: {rel(str(path))}"


# ------------------------------------------------------------------------ main


async def amain(
    args: argparse.Namespace, base: Path
) -> tuple[list[LevelResult], list[CeilingResult]]:
    peer = Peer()
    await peer.start()
    results: list[LevelResult] = []
    try:
        for level in [] if args.ceiling_only else args.level_list:
            results.append(await run_level(level, args, peer, base))
        cap = capacity([(r.level, r.failed) for r in results])
        if cap and not args.no_fractions:
            done = {r.level for r in results}
            for frac in (0.5, 0.8):
                lv = max(1, round(cap * frac))
                if lv not in done:
                    results.append(await run_level(lv, args, peer, base))
                    done.add(lv)
    finally:
        await peer.stop()
    ceilings: list[CeilingResult] = []
    if not args.no_ceiling:
        if os.geteuid() != 0:
            print("ceiling skipped: run.sh needs root (SIPp's pcap play)", file=sys.stderr)
        elif not args.ceiling_found:
            print(f"ceiling skipped: {CEILING} not found", file=sys.stderr)
        elif args.ceiling_workers:
            ceilings.append(await run_ceiling(args.ceiling_workers, args.ceiling_cps, base))
        else:
            levels = [r.level for r in results] or args.level_list
            for n in sorted({math.ceil(lv / CEILING_CALLS_PER_WORKER) for lv in levels}):
                ceilings.append(await run_ceiling(n, args.ceiling_cps, base))
    return results, ceilings


SAVED_ARGS = ("argv", "load_before", "commit", "front", "cps", "headroom", "ceiling_cps",
              "ceiling_workers", "quick", "reserved_slots")  # fmt: skip


def save_results(
    path: Path,
    args: argparse.Namespace,
    results: list[LevelResult],
    ceilings: list[CeilingResult],
    started: datetime,
    wall: float,
) -> None:
    data = {
        "started": started.isoformat(),
        "wall_s": wall,
        "args": {k: getattr(args, k) for k in SAVED_ARGS},
        "levels": [dataclasses.asdict(r) for r in results],
        "ceilings": [dataclasses.asdict(c) for c in ceilings],
    }
    path.write_text(json.dumps(data, indent=1))


def load_results(
    path: Path, args: argparse.Namespace
) -> tuple[argparse.Namespace, list[LevelResult], list[CeilingResult], datetime, float]:
    data = json.loads(path.read_text())
    for k, v in data["args"].items():
        setattr(args, k, v)
    results = [LevelResult(**r) for r in data["levels"]]
    ceilings = [CeilingResult(**c) for c in data["ceilings"]]
    return args, results, ceilings, datetime.fromisoformat(data["started"]), data["wall_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--levels", default="100,200,300,400,450", help="concurrent calls to try")
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
        "--headroom",
        type=float,
        default=0.2,
        help="extra workers, a fraction of ceil(C / 3) (default 0.2: with 0.05, round robin + 503 "
        "failover ran out of Kamailio branches at 200 calls)",
    )
    ap.add_argument(
        "--front",
        choices=("managed", "off"),
        default="managed",
        help="kamailio.mode; 'off' = one worker, no Kamailio (development)",
    )
    ap.add_argument(
        "--reserved-slots",
        type=int,
        default=RESERVED_SLOTS,
        help="workers.reserved_slots (default 1: 3 calls admitted per worker; 0 = what-if: "
        "4 per worker, no slot kept for dial)",
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
    args.level_list = [int(x) for x in args.levels.split(",") if x.strip()]
    args.ceiling_cps = args.ceiling_cps or args.cps
    args.ceiling_found = CEILING.exists()
    if args.front == "off" and max(args.level_list) > CALLS_PER_WORKER - args.reserved_slots:
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

    if args.render:
        args, results, ceilings, started, wall = load_results(args.render, args)
        base = None
    else:
        started = datetime.now()
        args.argv = sys.argv[1:]
        args.load_before = os.getloadavg()[0]
        args.commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        base = Path(tempfile.mkdtemp(prefix="sautikit-capacity-"))
        t0 = time.monotonic()
        results, ceilings = asyncio.run(amain(args, base))
        wall = time.monotonic() - t0

    suffix = "-quick" if args.quick else ""
    quick_png = RESULTS / f"capacity-{started:%Y-%m-%d}-quick.png"
    plot_path = args.plot or (quick_png if args.quick else PLOT)
    plot_note = plot(results, ceilings, plot_path)
    text = report(args, results, ceilings, started, wall, plot_note)
    out = args.out or RESULTS / f"capacity-{started:%Y-%m-%d}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if base is not None:
        save_results(out.with_suffix(".json"), args, results, ceilings, started, wall)
    print("\n" + text)
    print(f"report: {rel(str(out))} (figures also in {rel(str(out.with_suffix('.json')))})")
    bad = any(r.failed for r in results)
    if base is None:
        pass
    elif args.keep or bad:
        print(f"work dir kept: {base} (gateway.log, SIPp traces per level)")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
