"""How fast the call record store absorbs the node's fire-and-forget writes, and how long the
event loop stalls meanwhile (it should not: the writer thread does the SQLite work).

    PYTHONPATH=. python bench/call_records.py [--events 20000] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from gateway.calls.records import CallRecords


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        records = await CallRecords.open(Path(d) / "calls.sqlite3")
        lags: list[float] = []
        stop = False

        async def probe() -> None:
            while not stop:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        task = asyncio.ensure_future(probe())
        t0 = time.perf_counter()
        for i in range(args.events):
            call = f"c{i // 4}"
            if i % 4 == 0:
                records.note_call(
                    {"call_id": call, "status": "ringing", "started_at": "2026-06-27T10:00:00.000Z"}
                )
            records.note_event(call, f"e{i}", "call.started", {"call_id": call}, "t")
            if i % 500 == 0:
                await asyncio.sleep(0)  # the node's handler yields between messages
        queued = time.perf_counter() - t0
        n_queueing = len(lags)  # lags so far include the producer's own work on the loop
        await records.flush()
        total = time.perf_counter() - t0
        stop = True
        await task
        await records.close()
    drain = sorted(lags[n_queueing:])  # the loop idle, the writer thread committing
    lags.sort()
    print(
        f"{args.events} events (+{args.events // 4} call upserts): queued in {queued:.3f} s,"
        f" committed in {total:.3f} s = {args.events / total:,.0f} events/s"
    )
    print(
        f"loop lag while the writer drains: median {statistics.median(drain) * 1e3:.2f} ms,"
        f" p99 {drain[int(len(drain) * 0.99)] * 1e3:.2f} ms, max {drain[-1] * 1e3:.2f} ms"
    )
    print(
        f"loop lag overall (producer included): median {statistics.median(lags) * 1e3:.2f} ms,"
        f" p99 {lags[int(len(lags) * 0.99)] * 1e3:.2f} ms, max {lags[-1] * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
