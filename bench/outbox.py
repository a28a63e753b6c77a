"""The event outbox under a node's write load: the old synchronous path against the writer
thread, in one run, on the same machine.

N writer processes (workers) each append call events (started, answered, final: 3 a call) at
a steady rate on their asyncio loop, and one deliverer process (the supervisor) marks every
stored row delivered as it finds them, all on one outbox file (WAL, synchronous=FULL):

  before  `Outbox.append` / `Outbox.due` / `Outbox.mark_delivered` called on the loop (each a
          transaction and an fsync, lock waits included: what the node did before)
  after   `AsyncOutbox`: each process's calls queued on its writer thread, group-committed
          (the processes taking turns on the outbox's flock); the loop only queues and is
          handed the result

Per mode: events stored per second, commits per second (all processes' transactions), events
per commit, how long a loop is blocked per event (the call on the loop: mean and p99), the
loops' lag (a 10 ms ticker's lateness, p99), the time from emit to "on disk" (p50/p99), the
deliverer's marks per second and lock errors. Then after/before ratios.

    PYTHONPATH=. .venv/bin/python bench/outbox.py [--writers 50] [--rate 2] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.events.envelope import make_event
from gateway.events.outbox import AsyncOutbox, Outbox

URL = "https://cp.example/events"
KINDS = ("call.started", "call.answered", "call.completed")


def _data(call_id: str) -> dict[str, Any]:
    # about the size of a real call event
    return {
        "call_id": call_id,
        "direction": "inbound",
        "from": "+254700000001",
        "to": "+254711000002",
        "number_id": "num_01",
        "workspace_id": "ws_01",
        "session_id": call_id,
        "status": "completed",
        "duration_seconds": 42,
        "answered_at": "2026-12-02T03:00:00.000Z",
        "ended_at": "2026-12-02T03:00:42.000Z",
        "hangup_cause": "normal_clearing",
        "sip_code": 200,
    }


def _q(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(max(0.0, time.perf_counter() - t - 0.01))


async def _writer(
    mode: str, path: Path, index: int, rate: float, start: float, seconds: float
) -> dict[str, Any]:
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(_ticker(lags, stop))
    blocked: list[float] = []
    acks: list[float] = []
    errors = 0
    pending: list[asyncio.Future[bool]] = []
    sync = Outbox(path) if mode == "before" else None
    aob = await AsyncOutbox.open(path) if mode == "after" else None
    await asyncio.sleep(max(0.0, start - time.time()))
    t_next = time.monotonic()
    end = t_next + seconds
    n = 0
    while time.monotonic() < end:
        call_id = f"w{index}-c{n // 3}"
        kind = KINDS[n % 3]
        event = make_event(kind, "ws_01", _data(call_id))
        kw: dict[str, Any] = {
            "url": URL,
            "secret": "whsec_x",
            "policy": "control_plane",
            "call_id": call_id,
            "final": kind == "call.completed",
        }
        t0 = time.perf_counter()
        if sync is not None:
            try:
                sync.append(event, **kw)
            except sqlite3.OperationalError:
                errors += 1
            dt = time.perf_counter() - t0
            blocked.append(dt)
            acks.append(dt)
        else:
            assert aob is not None
            fut = aob.append(event, **kw)
            blocked.append(time.perf_counter() - t0)
            fut.add_done_callback(lambda f, t0=t0: acks.append(time.perf_counter() - t0))
            pending.append(fut)
        n += 1
        t_next += 1 / rate
        await asyncio.sleep(max(0.0, t_next - time.monotonic()))
    if pending:
        res = await asyncio.gather(*pending, return_exceptions=True)
        errors += sum(isinstance(r, BaseException) for r in res)
    stop.set()
    await tick
    commits = n - errors
    if aob is not None:
        commits = aob.committer.commits
        await aob.aclose()
    if sync is not None:
        sync.close()
    return {
        "events": n - errors,
        "commits": commits,
        "blocked": blocked,
        "acks": acks,
        "lags": lags,
        "errors": errors,
    }


async def _deliverer(mode: str, path: Path, start: float, seconds: float) -> dict[str, Any]:
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(_ticker(lags, stop))
    blocked: list[float] = []
    marks = errors = 0
    sync = Outbox(path) if mode == "before" else None
    aob = await AsyncOutbox.open(path) if mode == "after" else None
    await asyncio.sleep(max(0.0, start - time.time()))
    end = time.monotonic() + seconds + 1.0  # the writers' tail
    while time.monotonic() < end:
        if sync is not None:
            t0 = time.perf_counter()
            try:
                rows = sync.due(time.time(), 200)
                for r in rows:
                    sync.mark_delivered(r.id)  # one transaction each, as the Deliverer did
                marks += len(rows)
            except sqlite3.OperationalError:
                errors += 1
                rows = []
            blocked.append(time.perf_counter() - t0)
        else:
            assert aob is not None
            t0 = time.perf_counter()
            due = aob.due(time.time(), 200)
            blocked.append(time.perf_counter() - t0)
            rows = await due
            t0 = time.perf_counter()
            futs = [aob.mark_delivered(r.id) for r in rows]
            blocked.append(time.perf_counter() - t0)
            res = await asyncio.gather(*futs, return_exceptions=True)
            errors += sum(isinstance(x, BaseException) for x in res)
            marks += len(rows)
        await asyncio.sleep(0.02 if not rows else 0)
    stop.set()
    await tick
    commits = marks
    if aob is not None:
        commits = aob.committer.commits
        await aob.aclose()
    if sync is not None:
        sync.close()
    return {"marks": marks, "commits": commits, "blocked": blocked, "lags": lags, "errors": errors}


def _child(
    role: str, mode: str, path: str, index: int, rate: float, start: float, seconds: float, out: Any
) -> None:
    try:
        if role == "writer":
            res = asyncio.run(_writer(mode, Path(path), index, rate, start, seconds))
        else:
            res = asyncio.run(_deliverer(mode, Path(path), start, seconds))
    except BaseException as e:
        out.put(("error", f"{role} {index}: {type(e).__name__}: {e}"))
        raise
    out.put((role, res))


def run_mode(mode: str, writers: int, rate: float, seconds: float, tmp: Path) -> dict[str, float]:
    path = tmp / f"outbox-{mode}.sqlite3"
    Outbox(path).close()  # schema in place before the processes race to open it
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start = time.time() + 1.0 + 0.02 * writers  # all opened, then all begin together
    procs = [
        ctx.Process(target=_child, args=("writer", mode, str(path), i, rate, start, seconds, out))
        for i in range(writers)
    ]
    procs.append(
        ctx.Process(
            target=_child, args=("deliverer", mode, str(path), 0, rate, start, seconds, out)
        )
    )
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    failed = [r for role, r in results if role == "error"]
    if failed:
        raise SystemExit(f"{mode}: {len(failed)} process(es) failed: {failed[0]}")
    w = [r for role, r in results if role == "writer"]
    (d,) = [r for role, r in results if role == "deliverer"]
    blocked = [x for r in w for x in r["blocked"]]
    acks = [x for r in w for x in r["acks"]]
    lags = [x for r in w for x in r["lags"]]
    events = sum(r["events"] for r in w)
    commits = sum(r["commits"] for r in w) + d["commits"]
    with Outbox(path) as ob:
        counts = ob.counts()
    return {
        "events_per_s": events / seconds,
        "commits_per_s": commits / seconds,
        "events_per_commit": (events + d["marks"]) / max(1, commits),
        "blocked_mean_us": statistics.fmean(blocked) * 1e6 if blocked else 0.0,
        "blocked_p99_us": _q(blocked, 0.99) * 1e6,
        "lag_p99_ms": _q(lags, 0.99) * 1e3,
        "ack_p50_ms": _q(acks, 0.50) * 1e3,
        "ack_p99_ms": _q(acks, 0.99) * 1e3,
        "deliverer_marks_per_s": d["marks"] / seconds,
        "deliverer_blocked_ms_per_s": sum(d["blocked"]) * 1e3 / seconds,
        "deliverer_lag_p99_ms": _q(d["lags"], 0.99) * 1e3,
        "errors": sum(r["errors"] for r in w) + d["errors"],
        "left_pending": counts["pending"],
    }


ROWS = [
    ("events stored /s", "events_per_s", "{:,.0f}"),
    ("commits /s (all processes)", "commits_per_s", "{:,.0f}"),
    ("writes per commit", "events_per_commit", "{:.1f}"),
    ("loop blocked per event, mean (us)", "blocked_mean_us", "{:,.0f}"),
    ("loop blocked per event, p99 (us)", "blocked_p99_us", "{:,.0f}"),
    ("writers' loop lag p99 (ms)", "lag_p99_ms", "{:.1f}"),
    ("emit -> on disk p50 (ms)", "ack_p50_ms", "{:.1f}"),
    ("emit -> on disk p99 (ms)", "ack_p99_ms", "{:.1f}"),
    ("deliverer marks /s", "deliverer_marks_per_s", "{:,.0f}"),
    ("deliverer loop blocked (ms per s)", "deliverer_blocked_ms_per_s", "{:,.0f}"),
    ("deliverer loop lag p99 (ms)", "deliverer_lag_p99_ms", "{:.1f}"),
    ("lock errors", "errors", "{:.0f}"),
    ("left pending at the end", "left_pending", "{:.0f}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, default=50)
    # 2 events/s x 50 workers: ~400 concurrent IVR calls of ~12 s, 3 events each
    ap.add_argument("--rate", type=float, default=2.0, help="events/s per writer process")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    cmd = "PYTHONPATH=. " + " ".join([os.path.relpath(sys.executable), *sys.argv])
    print(f"$ {cmd}")
    print(
        f"{args.writers} writer processes x {args.rate:g} events/s for {args.seconds:g} s,"
        f" + 1 deliverer; {os.cpu_count()} CPU(s)"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        res = {
            m: run_mode(m, args.writers, args.rate, args.seconds, Path(d))
            for m in ("before", "after")
        }
    print(f"{'':36} {'before (sync)':>14} {'after (thread)':>15} {'after/before':>13}")
    for label, key, fmt in ROWS:
        b, a = res["before"][key], res["after"][key]
        ratio = f"{a / b:.2f}" if b else "-"
        print(f"{label:36} {fmt.format(b):>14} {fmt.format(a):>15} {ratio:>13}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
