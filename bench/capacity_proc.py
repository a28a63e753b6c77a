"""Machine and process figures for bench/capacity.py, read with psutil.

Machine CPU is counted as the ceiling's run.sh counts it: busy = user + nice + system, over
busy + idle + iowait. CPU times are seconds (floats), memory is MB (1e6 bytes). A node's process
tree is its supervisor's descendants plus whatever mentions the node's work dir on its command
line (Kamailio daemonizes, so it is no longer the supervisor's child).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system
    return busy, busy + t.idle + t.iowait


def busy_pct(before: tuple[float, float], after: tuple[float, float]) -> float:
    return 100 * (after[0] - before[0]) / max(1e-9, after[1] - before[1])


def cpu_s(p: psutil.Process) -> float:
    """user + system seconds of one process (0 if it is gone)."""
    try:
        t = p.cpu_times()
    except GONE:
        return 0.0
    return t.user + t.system


_cmds: dict[int, str] = {}


def cmdline(p: psutil.Process) -> str:
    """The command line, joined (cached per pid: read once)."""
    if p.pid not in _cmds:
        try:
            _cmds[p.pid] = " ".join(p.cmdline())
        except GONE:
            return ""
    return _cmds[p.pid]


def pids_mentioning(text: str) -> set[int]:
    """Processes whose command line contains `text` (never this one)."""
    me = os.getpid()
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.pid != me and any(text in part for part in cmd):
            found.add(p.pid)
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except GONE:
        return False


_procs: dict[int, psutil.Process] = {}
_roles: dict[int, str] = {}
_thread_names: dict[tuple[int, int], str] = {}


def process(pid: int) -> psutil.Process | None:
    """One psutil.Process per pid (cached: its CPU and name reads stay cheap)."""
    p = _procs.get(pid)
    if p is None or not p.is_running():
        try:
            p = _procs[pid] = psutil.Process(pid)
        except GONE:
            _procs.pop(pid, None)
            return None
    return p


def tree(roots: Iterable[int]) -> dict[int, psutil.Process]:
    """The roots and all their descendants that are alive now."""
    out: dict[int, psutil.Process] = {}
    for pid in roots:
        p = process(pid)
        if p is None:
            continue
        out[pid] = p
        with contextlib.suppress(*GONE):
            for child in p.children(recursive=True):
                out.setdefault(child.pid, process(child.pid) or child)
    return out


def role(p: psutil.Process, roots: set[int]) -> str:
    """supervisor / worker / kamailio / node other. A worker is a process started as
    `gateway.workers...` or one with pjmedia's threads (`clock`, `media`): a worker forked from
    a preloaded parent keeps the parent's command line. Cached once known."""
    if p.pid in roots:
        return "supervisor"
    if p.pid in _roles:
        return _roles[p.pid]
    try:
        cmd = cmdline(p)
        names = {thread_name(p.pid, t.id) for t in p.threads()}
    except GONE:
        return "node other"
    if "kamailio" in cmd:
        _roles[p.pid] = "kamailio"
    elif "gateway.workers.worker" in cmd or names & {"clock", "media"}:
        _roles[p.pid] = "worker"
    else:
        return "node other"  # not cached: a forked worker gets its pjmedia threads later
    return _roles[p.pid]


def thread_split(procs: Iterable[psutil.Process]) -> Counter[str]:
    """CPU seconds of these processes' threads by thread: `main` (the thread that runs Python's
    asyncio loop in a gateway worker, libHandleEvents in a bare one), other threads by name
    (pjmedia's `clock` and `media`, the gateway's Python threads), and `exited` (threads gone:
    process total minus its live threads)."""
    out: Counter[str] = Counter()
    for p in procs:
        try:
            total = cpu_s(p)
            threads = p.threads()
        except GONE:
            continue
        seen = 0.0
        for t in threads:
            ticks = t.user_time + t.system_time
            seen += ticks
            out[thread_name(p.pid, t.id)] += ticks
        out["exited"] += max(0.0, total - seen)
    return out


def thread_name(pid: int, tid: int) -> str:
    if tid == pid:
        return "main"
    key = (pid, tid)
    if key not in _thread_names:
        try:
            _thread_names[key] = psutil.Process(tid).name()  # /proc/<tid> names the thread
        except GONE:
            return "exited"
    return _thread_names[key]


def _sum_mb(procs: Iterable[psutil.Process], read: Callable[[psutil.Process], int]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(*GONE):
            total += read(p)
    return total / 1e6


def rss_mb(procs: Iterable[psutil.Process]) -> float:
    return _sum_mb(procs, lambda p: p.memory_info().rss)


def pss_mb(procs: Iterable[psutil.Process]) -> float:
    """PSS counts a page shared by n processes as 1/n in each: the tree's real footprint."""
    return _sum_mb(procs, lambda p: p.memory_full_info().pss)


def own_cpu() -> tuple[float, float]:
    """(this process, its reaped children) CPU seconds: the bench's voice app, and SIPp once it
    has exited (and py-spy/perf with --profile)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system, t.children_user + t.children_system


@dataclass
class Sample:
    t: float
    wall: float
    busy_pct: float  # whole machine, this second
    rss_mb: float  # the node's tree
    procs: int


class Node:
    """A node's process tree: `roots` (the supervisor) and `extra` (Kamailio) with their
    descendants."""

    def __init__(self, roots: set[int], extra: set[int] | None = None) -> None:
        self.roots = roots
        self.extra = extra or set()

    def members(self) -> dict[int, psutil.Process]:
        return tree(self.roots | self.extra)

    def workers(self) -> list[psutil.Process]:
        return [p for p in self.members().values() if role(p, self.roots) == "worker"]

    def cpu(self) -> float:
        return sum(cpu_s(p) for p in self.members().values())

    def split(self, children_label: str = "sipp") -> Counter[str]:
        """CPU seconds so far of the tree's processes by role, plus this process (the bench's
        voice app) and its reaped children."""
        out: Counter[str] = Counter()
        for p in self.members().values():
            out[role(p, self.roots)] += cpu_s(p)
        out["bench app"], out[children_label] = own_cpu()
        return out

    def worker_threads(self) -> Counter[str]:
        return thread_split(self.workers())


class Sampler:
    """Every second: machine CPU busy and the RSS of the node's tree; every 5 s its PSS."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.samples: list[Sample] = []
        self.pss_mb = 0.0
        self._task: asyncio.Task[None] | None = None

    def _read(self, with_pss: bool) -> tuple[float, float, int]:
        procs = list(self.node.members().values())
        return rss_mb(procs), pss_mb(procs) if with_pss else 0.0, len(procs)

    async def _run(self) -> None:
        before = machine_cpu()
        n = 0
        while True:
            await asyncio.sleep(1.0)
            now = machine_cpu()
            n += 1
            rss, pss, count = await asyncio.to_thread(self._read, n % 5 == 0)
            self.samples.append(
                Sample(time.monotonic(), time.time(), busy_pct(before, now), rss, count)
            )
            self.pss_mb = max(self.pss_mb, pss)
            before = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
