#!/usr/bin/env python3
"""Node start time and memory per worker: `[workers] start = "fork"` against `"spawn"`.

For each mode, in one run, starts on 127.0.0.1 a real node (`python -m gateway.cli run`) of N
workers (default 150; 4 calls each, no slot reserved) behind its managed Kamailio front, on free
ports, with its storage in a temp dir, and measures from the moment it is launched:
  * when each worker first answers SIP OPTIONS, sent by this script straight to the worker's own
    port over UDP loopback (every 50 ms to each worker not yet answering): the first and the last
    worker (all N answering: the figure of issue 9's goal, "ready within 10 s");
  * when `GET /readyz` first answers 200 (every worker and the front up);
  * then, once every worker answers, RSS and PSS of each worker process (psutil
    `memory_full_info`; PSS charges a shared page to each process by its share of it), and the
    node's whole PSS (supervisor + fork server + workers) per worker.
  * the CPU time (user + system) the node's processes had used by then: what the start costs,
    however busy the machine is with other work (wall times are not, on a shared machine).
Then stops the node (SIGTERM; anything left is killed) and goes on with the next mode. Prints
one row per mode, the fork/spawn ratios and the command that produced them.

Only run 150-worker measurements briefly on a shared machine: spawn mode imports ~60 MB of
Python per worker (about a second of CPU each).

usage: .venv/bin/python bench/node_start.py [--workers 150] [--modes fork,spawn]
       [--timeout 300] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.demo import free_port, free_port_block  # noqa: E402

WORKER_RE = re.compile(r"gateway\.workers\.worker --index (\d+) ")


@dataclass
class Result:
    mode: str
    workers: int
    first_options_s: float | None = None
    all_options_s: float | None = None
    readyz_s: float | None = None
    answering: int = 0
    rss_mib: float = 0.0  # mean per worker
    pss_mib: float = 0.0  # mean per worker
    node_pss_per_worker_mib: float = 0.0  # supervisor + fork server + workers, / workers
    cpu_s: float = 0.0  # CPU time (user + system) the node's processes had used by then
    load: float = 0.0  # the machine's 1-min load average at the end (other users' too)
    error: str = ""


def write_config(d: Path, mode: str, workers: int) -> tuple[Path, list[int], int]:
    sip = free_port(both=True)
    api = free_port()
    base = free_port_block(workers)
    text = f"""
[sip]
listen = "127.0.0.1:{sip}"
[api]
listen = "127.0.0.1:{api}"
token = "{secrets.token_hex(8)}"
[storage]
dir = "{d / "var"}"
[media]
rtp_port_start = 20000
rtp_ports_per_worker = 8
[workers]
count = {workers}
calls_per_worker = 4
reserved_slots = 0
sip_port_start = {base}
start = "{mode}"
[kamailio]
mode = "managed"
[log]
level = "INFO"
"""
    path = d / "gateway.toml"
    path.write_text(text)
    return path, list(range(base, base + workers)), api


def options(port: int, local: int, n: int) -> bytes:
    branch = f"z9hG4bK{secrets.token_hex(6)}"
    return (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:node-start@127.0.0.1>;tag=bench\r\n"
        f"To: <sip:127.0.0.1:{port}>\r\n"
        f"Call-ID: node-start-{port}-{n}@127.0.0.1\r\n"
        f"CSeq: {n} OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def probe_workers(ports: list[int], t0: float, deadline: float) -> dict[int, float]:
    """port -> seconds from t0 to its first 200 to OPTIONS."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    local = sock.getsockname()[1]
    answered: dict[int, float] = {}
    wanted = set(ports)
    n = 0
    try:
        while wanted - answered.keys() and time.monotonic() < deadline:
            n += 1
            for port in wanted - answered.keys():
                with contextlib.suppress(OSError):  # ICMP unreachable from a closed port
                    sock.sendto(options(port, local, n), ("127.0.0.1", port))
            until = time.monotonic() + 0.05
            while time.monotonic() < until:
                try:
                    data, (_, port) = sock.recvfrom(4096)
                except (BlockingIOError, ConnectionRefusedError):
                    await asyncio.sleep(0.005)
                    continue
                if port in wanted and port not in answered and data.startswith(b"SIP/2.0 200"):
                    answered[port] = time.monotonic() - t0
    finally:
        sock.close()
    return answered


async def poll_readyz(api: int, t0: float, deadline: float) -> float | None:
    timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{api}/readyz") as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
    return None


def node_processes(root: int) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(workers, the node's other processes: supervisor, fork server). Kamailio runs in its own
    session and is not counted (it is the same in both modes)."""
    workers: list[psutil.Process] = []
    others: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        sup = psutil.Process(root)
        others.append(sup)
        for p in sup.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if WORKER_RE.search(cmd):
                    workers.append(p)
                elif "gateway.forkserver" in cmd:
                    others.append(p)
    return workers, others


def node_cpu(root: int) -> float:
    """CPU seconds used so far by the supervisor and every descendant (fork server, workers,
    Kamailio): the start's cost independent of how busy the machine is with other work."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        sup = psutil.Process(root)
        for p in [sup, *sup.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def memory(procs: list[psutil.Process]) -> tuple[list[int], list[int]]:
    rss, pss = [], []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            m = p.memory_full_info()
            rss.append(m.rss)
            pss.append(m.pss)
    return rss, pss


def stop(proc: subprocess.Popen[bytes], var: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of it is left (its own session)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with contextlib.suppress(OSError, ValueError, ProcessLookupError, PermissionError):
        kam = int((var / "kamailio" / "kamailio.pid").read_text())
        if "kamailio" in psutil.Process(kam).name():
            os.killpg(kam, signal.SIGKILL)


async def run_mode(mode: str, workers: int, timeout: float, base: Path) -> Result:
    d = base / mode
    d.mkdir()
    config, ports, api = write_config(d, mode, workers)
    res = Result(mode, workers)
    log = (d / "gateway.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(  # noqa: ASYNC220 - the clock starts at this launch
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = t0 + timeout
    try:
        answered, res.readyz_s = await asyncio.gather(
            probe_workers(ports, t0, deadline), poll_readyz(api, t0, deadline)
        )
        res.answering = len(answered)
        if answered:
            res.first_options_s = min(answered.values())
        if len(answered) == workers:
            res.all_options_s = max(answered.values())
        else:
            res.error = f"{workers - len(answered)} worker(s) never answered OPTIONS"
        if proc.poll() is not None:
            res.error = f"the node exited ({proc.returncode}); see {d / 'gateway.log'}"
        res.cpu_s = node_cpu(proc.pid)
        res.load = os.getloadavg()[0]
        ws, others = node_processes(proc.pid)
        rss, pss = memory(ws)
        _, other_pss = memory(others)
        if ws:
            res.rss_mib = sum(rss) / len(rss) / 2**20
            res.pss_mib = sum(pss) / len(pss) / 2**20
            res.node_pss_per_worker_mib = (sum(pss) + sum(other_pss)) / len(ws) / 2**20
    finally:
        stop(proc, d / "var")
    return res


def fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x:.1f}{unit}" if unit == "s" else f"{x:.1f}"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=150)
    ap.add_argument("--modes", default="fork,spawn")
    ap.add_argument("--timeout", type=float, default=300, help="per mode, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sautikit-node-start-"))
    results: list[Result] = []
    for mode in args.modes.split(","):
        print(f"-- {mode}: starting {args.workers} workers ...", flush=True)
        r = await run_mode(mode, args.workers, args.timeout, base)
        results.append(r)
        if r.error:
            print(f"   {r.error}", flush=True)
    print()
    print(
        f"node start, {args.workers} workers x 4 calls, managed Kamailio front, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'mode':6} {'1st OPTIONS':>11} {'all OPTIONS':>11} {'/readyz 200':>11} "
        f"{'RSS/worker':>10} {'PSS/worker':>10} {'node PSS/worker':>15} {'node CPU':>8} "
        f"{'load':>5}"
    )
    for r in results:
        print(
            f"{r.mode:6} {fmt(r.first_options_s):>11} {fmt(r.all_options_s):>11} "
            f"{fmt(r.readyz_s):>11} {r.rss_mib:>8.1f}MB {r.pss_mib:>8.1f}MB "
            f"{r.node_pss_per_worker_mib:>13.1f}MB {r.cpu_s:>7.1f}s {r.load:>5.1f}"
        )
    by = {r.mode: r for r in results}
    if "fork" in by and "spawn" in by:
        f, s = by["fork"], by["spawn"]

        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}" if a and b else "-"

        print(
            f"fork/spawn: all OPTIONS {ratio(f.all_options_s, s.all_options_s)}, "
            f"/readyz {ratio(f.readyz_s, s.readyz_s)}, RSS {ratio(f.rss_mib, s.rss_mib)}, "
            f"PSS {ratio(f.pss_mib, s.pss_mib)}, node PSS "
            f"{ratio(f.node_pss_per_worker_mib, s.node_pss_per_worker_mib)}, "
            f"node CPU {ratio(f.cpu_s, s.cpu_s)}"
        )
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    if args.keep:
        print("logs:", base)
    else:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
