"""What a media link costs: CPU per link frame, and the latency one hop adds (under a minute).

    PYTHONPATH=. .venv/bin/python bench/link.py [--links 20] [--seconds 3] [--remote-runs 3]
        [--gil-links 8]

1. CPU: `--links` MediaLinks (pairs connected over loopback UDP), each fed by a tone and read
   by the bridge's master port, so both frame callbacks run 50 times a second per link. The
   process's CPU (user + sys, all threads) beyond the same bridge without links, divided by
   the link frames (one onFrameReceived + one onFrameRequested + their send/recv): once with
   the fast frame copies of media.link, once with SWIG's `bytes(frame.buf)` /
   `pj.ByteVector(...)` for comparison.
2. Latency, on audio: two tone generators start bursts on the same tick; one (697 Hz) goes
   straight to a recorder (a direct bridge edge), the other (1209 Hz) through link(s); the
   difference of the bursts' onsets in the recording is the latency the link path adds.
   (a) one hop inside this process (both ends on one clock); (b) a round trip through a second
   process (its own endpoint and clock: `--forward` mode, which relays one link to another),
   halved: one cross-process hop, including the random phase between the two bridges' clocks.
3. The GIL: every frame callback needs it, so a busy asyncio thread delays the bridge's clock
   thread (every call of the worker, not only the links). `--gil-links` links run while the
   main thread idles, then spins in pure Python (default switch interval, then 1 ms); the
   figures are the gaps between one link's successive frame requests (20 ms when on time) and
   the ticks the clock ran against the ticks real time had.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pjsua2 as pj

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media import link as link_mod  # noqa: E402
from media.link import FRAME_MS, MediaLink  # noqa: E402
from media.tones import Tone, steady  # noqa: E402
from tests.tones import onset, read_wav  # noqa: E402

RATE = 8000
DIRECT_HZ, LINK_HZ = 697, 1209


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


def pair() -> tuple[MediaLink, MediaLink]:
    a, b = MediaLink(RATE), MediaLink(RATE)
    a.connect(b.local_addr)
    b.connect(a.local_addr)
    return a, b


def cpu_run(ep: pj.Endpoint, links: int, seconds: float) -> tuple[float, int]:
    """(CPU seconds, link frames handled) over `seconds` with `links` links busy."""
    master = ep.audDevManager().getPlaybackDevMedia()
    tone = steady(RATE, 852)
    tone.audio_media.startTransmit(master)
    made: list[MediaLink] = []
    for _ in range(links // 2):
        made.extend(pair())
    for lk in made:
        tone.audio_media.startTransmit(lk.audio_media)
        lk.audio_media.startTransmit(master)
    time.sleep(0.5)
    before = [lk.stats() for lk in made]
    c0, t0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = time.process_time(), time.monotonic()
    after = [lk.stats() for lk in made]
    frames = sum(min(a.sent - b.sent, a.played + a.silence - b.played - b.silence)
                 for a, b in zip(after, before, strict=True))
    errors = sum(a.errors for a in after)
    for lk in made:
        tone.audio_media.stopTransmit(lk.audio_media)
        lk.audio_media.stopTransmit(master)
        lk.close()
    tone.audio_media.stopTransmit(master)
    time.sleep(0.1)
    tone.close()
    if errors:
        print(f"  ({errors} callback errors)")
    return (c1 - c0) * seconds / (t1 - t0), frames


def cpu_figures(ep: pj.Endpoint, links: int, seconds: float) -> dict[str, Any]:
    base, _ = cpu_run(ep, 0, seconds)
    fast, frames = cpu_run(ep, links, seconds)
    link_mod._FAST = False
    try:
        slow_links = max(2, links // 4)
        slow, slow_frames = cpu_run(ep, slow_links, seconds)
    finally:
        link_mod._FAST = True
    return {
        "links": links, "seconds": seconds, "base_cpu_s": round(base, 3),
        "cpu_s": round(fast, 3), "link_frames": frames,
        "us_per_link_frame": round(1e6 * (fast - base) / max(1, frames), 1),
        "slow_links": slow_links,
        "slow_us_per_link_frame": round(1e6 * (slow - base) / max(1, slow_frames), 1),
        "cpu_pct_of_core_per_link": round(100 * (fast - base) / seconds / max(1, links), 2),
    }


def bursts(direct: Tone, via: Tone, n: int, period: float) -> None:
    for _ in range(n):
        direct.play()
        via.play()
        time.sleep(period)


def onsets(wav: Path, n: int, period: float) -> list[float]:
    x, rate = read_wav(wav)
    out: list[float] = []
    t = 0.0
    for _ in range(n + 1):
        d = onset(x, rate, DIRECT_HZ, after_s=t)
        if d is None:
            break
        v = onset(x, rate, LINK_HZ, after_s=d - 0.05)
        if v is not None and v - d < period * 0.8:
            out.append(1000 * (v - d))
        t = d + period * 0.8
    return out


def latency_run(ep: pj.Endpoint, remote: bool, n: int = 8, period: float = 0.4
                ) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="linkbench"))
    wav = workdir / ("remote.wav" if remote else "local.wav")
    rec = pj.AudioMediaRecorder()
    rec.createRecorder(str(wav))
    seg_direct = ((DIRECT_HZ, 0, 200, 0),)
    seg_link = ((LINK_HZ, 0, 200, 0),)
    direct = Tone(RATE, seg_direct, loop=False, start=False)
    via = Tone(RATE, seg_link, loop=False, start=False)
    proc = None
    if remote:
        out_l, back_l = MediaLink(RATE), MediaLink(RATE)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--forward", json.dumps([list(out_l.local_addr),
                                                                list(back_l.local_addr)])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout is not None
        far = json.loads(proc.stdout.readline())
        out_l.connect(tuple(far[0]))
        back_l.connect(tuple(far[1]))
        send, recv = out_l, back_l
        links = [out_l, back_l]
    else:
        send, recv = pair()
        links = [send, recv]
    direct.audio_media.startTransmit(rec)
    via.audio_media.startTransmit(send.audio_media)
    recv.audio_media.startTransmit(rec)
    time.sleep(0.5)
    bursts(direct, via, n, period)
    time.sleep(0.3)
    stats = [lk.stats() for lk in links]
    direct.audio_media.stopTransmit(rec)
    via.audio_media.stopTransmit(send.audio_media)
    recv.audio_media.stopTransmit(rec)
    time.sleep(0.1)
    del rec  # the WAV header is written when the recorder goes
    time.sleep(0.3)
    for lk in links:
        lk.close()
    direct.close()
    via.close()
    if proc is not None:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    ms = onsets(wav, n, period)
    hops = 2 if remote else 1
    return {
        "path": "round trip via a second process (2 hops)" if remote else "1 hop, same process",
        "bursts": len(ms),
        "added_ms_mean": round(statistics.mean(ms), 1) if ms else None,
        "added_ms_min": round(min(ms), 1) if ms else None,
        "added_ms_max": round(max(ms), 1) if ms else None,
        "per_hop_ms_mean": round(statistics.mean(ms) / hops, 1) if ms else None,
        "link_stats": [s.__dict__ for s in stats],
    }


class _TimedLink(MediaLink):
    """A link that notes when the bridge asks it for a frame."""

    stamps: list[float]

    def _on_frame_requested(self, frame: pj.MediaFrame) -> None:
        self.stamps.append(time.perf_counter())
        super()._on_frame_requested(frame)


def gil_run(ep: pj.Endpoint, links: int, seconds: float) -> list[dict[str, Any]]:
    master = ep.audDevManager().getPlaybackDevMedia()
    tone = steady(RATE, 852)
    made: list[_TimedLink] = []
    for _ in range(max(1, links // 2)):
        a, b = _TimedLink(RATE), _TimedLink(RATE)
        a.stamps, b.stamps = [], []
        a.connect(b.local_addr)
        b.connect(a.local_addr)
        made += [a, b]
    for lk in made:
        tone.audio_media.startTransmit(lk.audio_media)
        lk.audio_media.startTransmit(master)
    time.sleep(0.3)
    out = []
    interval = sys.getswitchinterval()
    for name, busy, switch in (("idle", False, interval), ("busy", True, interval),
                               ("busy", True, 0.001)):
        sys.setswitchinterval(switch)
        made[0].stamps.clear()
        t0 = time.monotonic()
        if busy:
            x = 0
            while time.monotonic() - t0 < seconds:
                x += 1
        else:
            time.sleep(seconds)
        wall = time.monotonic() - t0
        st = list(made[0].stamps)
        gaps = sorted(1000 * (b - a) for a, b in itertools.pairwise(st))
        n = len(gaps)
        out.append({"main_thread": name, "switch_ms": round(switch * 1000, 1), "links": len(made),
                    "ticks_pct_of_real_time": round(100 * len(st) / (wall * 1000 / FRAME_MS)),
                    "gap_p50_ms": round(gaps[n // 2], 1) if n else None,
                    "gap_p99_ms": round(gaps[int(n * 0.99)], 1) if n else None,
                    "gap_max_ms": round(gaps[-1], 1) if n else None})
    sys.setswitchinterval(interval)
    for lk in made:
        tone.audio_media.stopTransmit(lk.audio_media)
        lk.audio_media.stopTransmit(master)
        lk.close()
    time.sleep(0.1)
    tone.close()
    return out


def forward(addrs: str) -> None:
    """Second-process mode: link X (peer of the first's out link) relays into link Y (peer of
    its back link); runs until stdin closes."""
    peers = json.loads(addrs)
    out = os.fdopen(os.dup(1), "w", buffering=1)  # fd 1 for the reply only: pjlib prints there
    os.dup2(2, 1)
    ep = make_ep()
    x, y = MediaLink(RATE), MediaLink(RATE)
    x.connect(tuple(peers[0]))
    y.connect(tuple(peers[1]))
    x.audio_media.startTransmit(y.audio_media)
    out.write(json.dumps([list(x.local_addr), list(y.local_addr)]) + "\n")
    sys.stdin.read()
    x.audio_media.stopTransmit(y.audio_media)
    time.sleep(0.1)
    x.close()
    y.close()
    link_mod.release_closed()
    del x, y
    ep.libDestroy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--links", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--remote-runs", type=int, default=3)
    ap.add_argument("--gil-links", type=int, default=8)
    ap.add_argument("--forward", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.forward:
        forward(args.forward)
        return
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"fast frame copies: {link_mod._FAST}; cores: {os.cpu_count()}; "
          f"load: {os.getloadavg()[0]:.2f}")
    ep = make_ep()
    cpu = cpu_figures(ep, args.links, args.seconds)
    print(f"CPU: {cpu['us_per_link_frame']} µs per link frame (both callbacks + UDP), "
          f"{cpu['cpu_pct_of_core_per_link']}% of a core per link; SWIG copies: "
          f"{cpu['slow_us_per_link_frame']} µs")
    print(json.dumps(cpu))
    local = latency_run(ep, remote=False)
    print(f"latency, {local['path']}: +{local['added_ms_mean']} ms "
          f"(min {local['added_ms_min']}, max {local['added_ms_max']}) over a direct edge")
    # Each second process starts at its own clock phase relative to ours: a few of them.
    remote = [latency_run(ep, remote=True) for _ in range(args.remote_runs)]
    for r in remote:
        print(f"latency, {r['path']}: +{r['added_ms_mean']} ms "
              f"(min {r['added_ms_min']}, max {r['added_ms_max']}), "
              f"{r['per_hop_ms_mean']} ms per hop")
    print(json.dumps({"local": local, "remote": remote}))
    for g in gil_run(ep, args.gil_links, 2.0):
        print(f"GIL: {g['links']} links, main thread {g['main_thread']} (switch interval "
              f"{g['switch_ms']} ms): clock at {g['ticks_pct_of_real_time']}% of real time, "
              f"request gaps p50 {g['gap_p50_ms']} p99 {g['gap_p99_ms']} max {g['gap_max_ms']} ms")
    link_mod.release_closed()
    import gc

    gc.collect()
    ep.libDestroy()


if __name__ == "__main__":
    main()
