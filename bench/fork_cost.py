"""What an AudioFork costs per 20 ms frame: its capture and playback paths (a few seconds).

    PYTHONPATH=. .venv/bin/python bench/fork_cost.py [--forks 1,4,20] [--seconds 2]

No SIP: each fork's "call" is a stand-in whose conference port is a steady tone generator
(the "caller": it speaks the tone into the fork's port and swallows what the fork plays), so
the bridge drives every fork callback 50 times a second, as on a call. Per mode, `--forks`
forks run for `--seconds` (each count in `--forks` in turn: a worker holds at most 4 calls, so
4 is the most forks one clock thread carries; 20 compares with bench/link.py's 20 links):

- inbound (capture only): one onFrameReceived (copy, one call_soon_threadsafe) + one idle
  onFrameRequested per tick;
- inbound + playback: the same while every fork plays a frame per tick (an asyncio task keeps
  each queue ~100 ms ahead, in uneven chunks), so onFrameRequested pops and fills;
- both + playback: also the tap port and the stereo interleave;
- outbound + playback: the tap carries the track; the playback port's receive side is idle.

Two figures per mode:
1. in-callback time: every callback wrapped with perf_counter_ns (the wrapper's own cost,
   measured on an empty callback, subtracted): p50 / p99 µs per call, per path;
2. process CPU (user + sys, all threads: clock thread, asyncio delivery of on_audio, play())
   beyond the same bridge without forks, divided by fork-ticks: the whole per-frame cost.
Then the same inbound capture with SWIG's frame copy (media.ports.FAST off) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pjsua2 as pj

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media import ports  # noqa: E402
from media.fork import AudioFork, Track  # noqa: E402
from media.tones import steady  # noqa: E402

RATE = 8000


def make_ep() -> pj.Endpoint:
    ep = pj.Endpoint()
    ep.libCreate()
    ec = pj.EpConfig()
    ec.uaConfig.threadCnt = 0
    ec.logConfig.consoleLevel = 0
    ec.logConfig.level = 0
    mc = ec.medConfig
    mc.clockRate = mc.sndClockRate = RATE
    mc.sndAutoCloseTime = -1
    mc.ecTailLen = 0
    mc.noVad = True
    ep.libInit(ec)
    ep.audDevManager().setNullDev()
    ep.libStart()
    return ep


class StandInCall:
    """What AudioFork uses of a SipCall, around one conference port."""

    def __init__(self, loop: asyncio.AbstractEventLoop, am: pj.AudioMedia) -> None:
        self.loop = loop
        self.endpoint = SimpleNamespace(cfg=SimpleNamespace(clock_rate=RATE))
        self._am = am
        self.on_media: list[Any] = []
        self.on_end: list[Any] = []
        self.ended = False
        self.pj_id = 0
        self.taps: list[Any] = []

    def audio_media(self) -> pj.AudioMedia:
        return self._am

    def add_outbound_tap(self, port: Any) -> None:
        self.taps.append(port)

    def remove_outbound_tap(self, port: Any) -> None:
        self.taps = [t for t in self.taps if t is not port]


class Timer:
    """perf_counter_ns around a callback; samples in ns."""

    def __init__(self) -> None:
        self.ns: list[int] = []

    def wrap(self, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        ns, clock = self.ns, time.perf_counter_ns

        def timed(frame: Any) -> None:
            t = clock()
            fn(frame)
            ns.append(clock() - t)
        return timed


def _empty(frame: Any) -> None:
    pass


def pct(xs: list[int], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))] / 1000 if s else 0.0


async def feeder(forks: list[AudioFork], stop: asyncio.Event) -> None:
    """Keep every fork's queue ~100 ms ahead, in uneven chunks (a TTS server's way)."""
    sizes = [333, 1000, 77, 640, 2501, 160, 999]
    tone = bytes(range(256)) * 40
    i = 0
    while not stop.is_set():
        for f in forks:
            while f.stats().queued_frames < 5:
                n = sizes[i % len(sizes)]
                f.play(tone[:n])
                i += 1
        await asyncio.sleep(0.02)


async def run(mode: str, n: int, seconds: float, timed: bool) -> dict[str, Any]:
    """mode: "none" (the bridge with the tone only), or "<track>[+play]"."""
    loop = asyncio.get_running_loop()
    tone = steady(RATE, 852)
    forks: list[AudioFork] = []
    timers: dict[str, Timer] = {}
    frames = [0]
    stop = asyncio.Event()

    def on_audio(pcm: bytes) -> None:
        frames[0] += 1

    if mode != "none":
        track_s, _, play = mode.partition("+")
        track: Track = track_s  # type: ignore[assignment]
        for _ in range(n):
            fk = AudioFork(StandInCall(loop, tone.audio_media), track, on_audio)  # type: ignore[arg-type]
            fk.start()
            forks.append(fk)
        if timed:
            for name in ("capture", "playback", "tap"):
                timers[name] = Timer()
            for fk in forks:
                p = fk._play_port
                assert p is not None
                owner: Any = p.owner
                if track != "outbound":
                    owner._on_frame_received = timers["capture"].wrap(owner._on_frame_received)
                owner._on_frame_requested = timers["playback"].wrap(owner._on_frame_requested)
                if fk._tap_port is not None:
                    towner: Any = fk._tap_port.owner
                    name = "capture" if track == "outbound" else "tap"
                    towner._on_frame_received = timers[name].wrap(towner._on_frame_received)
        feed = asyncio.ensure_future(feeder(forks, stop)) if play else None
    else:
        feed = None
    await asyncio.sleep(0.5)
    for t in timers.values():
        t.ns.clear()
    f0 = frames[0]
    played0 = sum(f.stats().frames_played for f in forks)
    c0, t0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = time.process_time(), time.monotonic()
    got = frames[0] - f0
    played = sum(f.stats().frames_played for f in forks) - played0
    stop.set()
    if feed is not None:
        await feed
    errors = sum(f.stats().errors for f in forks)
    for fk in forks:
        fk.close()
    await asyncio.sleep(0.3)
    tone.close()
    out: dict[str, Any] = {"mode": mode, "forks": len(forks),
                           "cpu_s": (c1 - c0) * seconds / (t1 - t0),
                           "frames_to_asyncio": got, "frames_played": played, "errors": errors}
    for name, t in timers.items():
        if t.ns:
            out[f"{name}_us_p50"] = pct(t.ns, 0.5)
            out[f"{name}_us_p99"] = pct(t.ns, 0.99)
            out[f"{name}_calls"] = len(t.ns)
    return out


def wrapper_cost() -> float:
    t = Timer()
    w = t.wrap(_empty)
    for _ in range(20000):
        w(None)
    return statistics.median(t.ns) / 1000


async def amain(args: argparse.Namespace) -> None:
    over = wrapper_cost()
    print(f"timing wrapper's own cost (subtracted): {over:.2f} µs")
    base = await run("none", 0, args.seconds, False)
    print(f"bridge with the tone alone: {100 * base['cpu_s'] / args.seconds:.2f}% of a core")
    out = []
    for n in [int(x) for x in str(args.forks).split(",")]:
        print(f"-- {n} fork(s)")
        out.append(await figures(n, args, base, over))
    print(json.dumps({"base_cpu_s": round(base["cpu_s"], 3), "seconds": args.seconds,
                      "runs": out}))


async def figures(n: int, args: argparse.Namespace, base: dict[str, Any], over: float
                  ) -> dict[str, Any]:
    modes = ["inbound", "inbound+play", "both+play", "outbound+play"]
    results = []
    for m in modes:
        cpu = await run(m, n, args.seconds, False)
        tm = await run(m, n, args.seconds, True)
        ticks = n * args.seconds * 50
        per_tick = 1e6 * (cpu["cpu_s"] - base["cpu_s"]) / ticks
        r = {"mode": m, "forks": n, "cpu_us_per_fork_tick": round(per_tick, 1),
             "cpu_pct_of_core_per_fork": round(100 * per_tick / 20000, 3),
             "frames_to_asyncio": cpu["frames_to_asyncio"], "frames_played": cpu["frames_played"],
             "errors": cpu["errors"] + tm["errors"]}
        for k, v in tm.items():
            if k.endswith("_p50") or k.endswith("_p99"):
                r[k] = round(max(0.0, v - over), 2)
        results.append(r)
        paths = ", ".join(f"{k[:-7]} p50 {r[k]} µs (p99 {r[k[:-3] + 'p99']})"
                          for k in r if k.endswith("_us_p50"))
        print(f"{m:14s}: {per_tick:5.1f} µs CPU per fork tick ({r['cpu_pct_of_core_per_fork']}% "
              f"of a core per fork); in callback: {paths}")
    ports.FAST = False
    try:
        cpu = await run("inbound", n, args.seconds, False)
        tm = await run("inbound", n, args.seconds, True)
    finally:
        ports.FAST = True
    per_tick = 1e6 * (cpu["cpu_s"] - base["cpu_s"]) / (n * args.seconds * 50)
    swig = {"mode": "inbound (SWIG copies)", "cpu_us_per_fork_tick": round(per_tick, 1),
            "capture_us_p50": round(tm["capture_us_p50"] - over, 2)}
    results.append(swig)
    print(f"inbound, SWIG bytes(frame.buf): {per_tick:.1f} µs CPU per fork tick; capture p50 "
          f"{swig['capture_us_p50']} µs")
    return {"forks": n, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forks", default="1,4,20", help="fork counts, comma separated")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"fast frame copies: {ports.FAST}; cores: {os.cpu_count()}; "
          f"load: {os.getloadavg()[0]:.2f}")
    ep = make_ep()
    try:
        asyncio.run(amain(args))
    finally:
        import gc

        gc.collect()
        ep.libDestroy()


if __name__ == "__main__":
    main()
