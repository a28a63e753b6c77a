#!/usr/bin/env python3
"""Browser calling (issue 12) on one node, all on 127.0.0.1, all real parts.

The node: `python -m gateway.cli run --config FILE` as a child (a TOML made like the browser
tests': tests/integration/conftest.write_config + webrtc.webrtc_section() + two_workers() +
FRONT, i.e. the managed Kamailio front with its websocket listener, rtpengine started by the
node, two workers of 4 calls), ready on "sautikit-gateway ready", stopped with SIGTERM. Its voice
app is an aiohttp server in this process: every call gets
{"actions": [{"play": {"url": <a steady 1209 Hz WAV, 5 s>, "loop": L}}, {"hangup": {}}]}
(L = 1 for the set-up calls, enough loops to outlast the hold in phase 3).

1. REGISTER round trip through the front (Kamailio websocket + the token check it makes with
   http_client against the node's API): tests/integration/wssip.WsSipClient on one websocket,
   a token minted on POST /v1/webrtc/token; N REGISTERs, each timed from the send of the frame
   to the final answer (perf_counter). Baseline on the same socket, interleaved one for one:
   an OPTIONS to the front's domain (same headers minus Authorization), which Kamailio answers
   itself (no HTTP check), so REGISTER - OPTIONS is what the token check (and usrloc save)
   costs. 3 of each first as warm-up, not counted. Goal: REGISTER <= 50 ms.
2. Call set-up: one headless Chromium (tests/integration/browser.BrowserPhone, the gateway's
   page /demo/phone, JsSIP), registered; N sequential calls to the number; per call, once the
   page heard the tone, sautiPhone.timings() (ms after sautiPhone.call()): invite_sent_ms
   (getUserMedia + offer + ICE gathering), answered_ms (the 200 in JsSIP), first_audio_ms
   (first 5 ms of remote audio above -50 dBFS in the page's WebAudio capture); then the page
   hangs up (sautiPhone.hangup(); --hangup app: the app hangs up after a 0.6 s tone and the
   page waits for the worker's BYE). (The plain calls run first and phase 3 gets a fresh
   node: a slot leak at the front, fixed since, once hid behind sequential browser calls; the
   order keeps each phase independent of the others.) INVITE -> 200 on the browser's wire is
   answered_ms - invite_sent_ms. For comparison in the same run, the same N calls from a plain
   SIP caller (a raw UDP UAC in this process, PCMU/PCMA offer, timed with perf_counter like the
   websocket client) straight to the front: INVITE -> 200 and INVITE -> first RTP packet above
   -50 dBFS; it sends ACK and BYE on first audio. The WebRTC overhead shows as ratios: on
   INVITE -> 200, the front's token check of the INVITE (http_client), rtpengine's offer and
   answer and JsSIP; on INVITE -> first audio also ICE, DTLS-SRTP, Chromium's jitter buffer and
   the page's 1024-sample ScriptProcessor block (~21 ms at 48 kHz).
3. rtpengine CPU per WebRTC call: K Chromiums (one BrowserPhone each: the driver drives one
   page), each registered as its own client. CPU time is each process's threads' on-CPU time
   from /proc/PID/task/*/schedstat (ns; psutil's user+system moves in 10 ms ticks). Idle
   baseline first: rtpengine (the node's child named rtpengine) over H s with the K
   registered and no call. Then K concurrent calls (the tone loops), and once all K hear it,
   rtpengine over H s: CPU ms per call-second and % of one core, beside the idle rate; the
   node's workers and Kamailio the same way for comparison, and the machine's busy % (the
   Chromiums share the 2 cores, so it is not the node's).

usage: PYTHONPATH=. .venv/bin/python bench/webrtc.py
           [--quick] [--attempts 50] [--concurrent 4] [--hold-s 20]
           [--out bench/results/webrtc-DATE.md] [--keep]
--quick: attempts 5, concurrent 2, hold 5 s (about 1 min). Needs kamailio (websocket,
http_client modules), rtpengine, chromium, node + node_modules (playwright-core, jssip bundle).
Full run (50 / 4 / 20 s): about 3 minutes.
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
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.demo import free_port_block  # noqa: E402
from tests.integration.browser import BrowserPhone, tone_wav  # noqa: E402
from tests.integration.conftest import NUMBER, Gateway, start_gateway, write_config  # noqa: E402
from tests.integration.pcap_audio import g711_decode  # noqa: E402
from tests.integration.sipraw import ack_and_bye, invite  # noqa: E402
from tests.integration.webrtc import (  # noqa: E402
    DOMAIN,
    FRONT,
    tone_wav_bytes,
    two_workers,
    webrtc_section,
)
from tests.integration.wssip import WsSipClient  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TONE_HZ = 1209.0
MIC_HZ = 852.0
FIRST_AUDIO_DBFS = -50.0  # as the page's timings().first_audio_ms
WARMUP = 3
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), p)) if xs else math.nan


# -- the voice app --------------------------------------------------------------------------
class VoiceApp:
    def __init__(self) -> None:
        self.secret = secrets.token_hex(8)
        self.loop = 1  # play loops of the 5 s tone
        self.short = False  # a 0.6 s tone instead: the app hangs up (see --hangup)
        self.requests = 0
        self.base = ""
        self._wav = tone_wav_bytes(TONE_HZ, 5.0)
        self._short = tone_wav_bytes(TONE_HZ, 0.6)
        self._runner: web.AppRunner | None = None

    async def voice(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        return web.json_response({"actions": [
            {"play": {"url": f"{self.base}/{'short' if self.short else 'tone'}.wav",
                      "loop": self.loop}}, {"hangup": {}}]})

    async def tone(self, request: web.Request) -> web.Response:
        body = self._short if request.path == "/short.wav" else self._wav
        return web.Response(body=body, content_type="audio/wav")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/voice", self.voice)
        app.router.add_get("/tone.wav", self.tone)
        app.router.add_get("/short.wav", self.tone)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# -- the node -------------------------------------------------------------------------------
@dataclass
class Node:
    gw: Gateway
    ws_url: str
    work: Path

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.gw.api_port}"

    def procs(self) -> dict[str, list[psutil.Process]]:
        """rtpengine, workers, kamailio: the node's descendants (Kamailio runs -DD, a child),
        plus any kamailio whose command line names the work dir."""
        out: dict[str, list[psutil.Process]] = {"rtpengine": [], "workers": [], "kamailio": []}
        seen: set[int] = set()
        kids = psutil.Process(self.gw.proc.pid).children(recursive=True)
        for p in psutil.process_iter(["cmdline"]):
            if any(str(self.work) in part for part in (p.info.get("cmdline") or [])):
                kids.append(p)
        for p in kids:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if p.name() == "rtpengine":
                    out["rtpengine"].append(p)
                elif "gateway.workers.worker" in cmd:
                    out["workers"].append(p)
                elif p.name() == "kamailio":
                    out["kamailio"].append(p)
        return out


def cpu_of(ps: list[psutil.Process]) -> float:
    """CPU seconds of the processes: the sum of their live threads' on-CPU time from
    /proc/PID/task/*/schedstat (nanoseconds; psutil's user+system move in 10 ms ticks, too
    coarse for a few ms/s), psutil's figure where schedstat is not readable."""
    total = 0.0
    for p in ps:
        ns = 0
        try:
            for task in Path(f"/proc/{p.pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    ns += int((task / "schedstat").read_text().split()[0])
            total += ns / 1e9
        except OSError:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def machine() -> tuple[float, float]:
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system
    return busy, busy + t.idle + t.iowait


async def start_node(work: Path, app: VoiceApp, concurrent: int) -> Node:
    section, ws_port = webrtc_section()
    lo = int(re.search(r"rtp_port_min = (\d+)", section).group(1))  # type: ignore[union-attr]
    # 40 ports are the tests' range; rtpengine takes about 4 per call (2 per side)
    section = re.sub(r"rtp_port_max = \d+", f"rtp_port_max = {lo + max(39, 8 * concurrent)}",
                     section)
    nworkers = max(2, math.ceil(concurrent / 4))
    workers = (two_workers() if nworkers == 2 else
               f"count = {nworkers}\ncalls_per_worker = 4\n"
               f"sip_port_start = {free_port_block(nworkers)}")
    config = write_config(work, voice_url=f"{app.base}/voice", app_secret=app.secret,
                          events_url=None, extra=section, workers=workers, kamailio=FRONT)
    gw = await asyncio.to_thread(start_gateway, config, work, 60)
    return Node(gw, f"ws://127.0.0.1:{ws_port}/", work)


async def mint(node: Node, name: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(
        f"{node.api}/v1/webrtc/token", json={"client_name": name, "phone_number": NUMBER},
        headers={"Authorization": "Bearer test-token"},
    ) as r:
        if r.status != 201:
            raise RuntimeError(f"mint {r.status}: {await r.text()}")
        return dict(await r.json())


# -- 1. REGISTER vs OPTIONS -----------------------------------------------------------------
@dataclass
class RegisterRun:
    register_ms: list[float] = field(default_factory=list)
    options_ms: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def register_phase(node: Node, attempts: int) -> RegisterRun:
    run = RegisterRun()
    minted = await mint(node, "bench-reg")
    async with WsSipClient(node.ws_url, "bench-reg", DOMAIN) as ua:
        for i in range(WARMUP + attempts):
            for kind in ("OPTIONS", "REGISTER"):
                r = await (ua.options() if kind == "OPTIONS"
                           else ua.register(minted["token"], expires=300))
                if r.code != 200:
                    run.failed.append(f"{kind} {r.code} {r.reason}")
                elif i >= WARMUP:
                    (run.options_ms if kind == "OPTIONS" else run.register_ms).append(r.rtt_ms)
                await asyncio.sleep(0.02)  # keep under the front's flood limit (100/s/source)
        await ua.register(minted["token"], expires=0)
    say(f"register: REGISTER p50 {pct(run.register_ms, 50):.2f} ms, OPTIONS p50 "
        f"{pct(run.options_ms, 50):.2f} ms, failed {len(run.failed)}")
    return run


# -- 2. call set-up: the browser, then a plain SIP caller -----------------------------------
@contextlib.contextmanager
def quiet_stderr() -> Any:
    """fd 2 on /dev/null while a child is started (it inherits it); restored after."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


async def open_phone(node: Node, work: Path, name: str) -> BrowserPhone:
    mic = tone_wav(work / f"mic-{name}.wav", MIC_HZ)
    with quiet_stderr():  # the driver echoes the page's console to stderr (its --log has it)
        phone = await BrowserPhone.launch(mic, work / f"browser-{name}.log")
    try:
        await phone.goto(f"{node.api}/demo/phone")
        minted = await mint(node, name)
        opts = {"token": minted["token"], "endpoint": minted["endpoint"],
                "uri": minted["sipProfile"]["uri"], "displayName": name}
        reg = await phone.eval(f"sautiPhone.register({json.dumps(opts)})")
        if not (reg["ok"] and reg["code"] == 200):
            raise RuntimeError(f"browser {name} did not register: {reg}")
    except BaseException:
        await phone.close()
        raise
    return phone


async def wait_first_audio(phone: BrowserPhone, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        t = await phone.eval("sautiPhone.timings()")
        if t["first_audio_ms"] is not None:
            return dict(t)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no audio in the page: {t}")
        await asyncio.sleep(0.02)


@dataclass
class BrowserRun:
    invite_sent_ms: list[float] = field(default_factory=list)
    answered_ms: list[float] = field(default_factory=list)
    first_audio_ms: list[float] = field(default_factory=list)
    invite_200_ms: list[float] = field(default_factory=list)  # answered - invite_sent
    invite_audio_ms: list[float] = field(default_factory=list)  # first_audio - invite_sent
    failed: list[str] = field(default_factory=list)
    version: str = ""


async def browser_calls(node: Node, work: Path, app: VoiceApp, attempts: int,
                        hangup: str) -> BrowserRun:
    run = BrowserRun()
    app.short = hangup == "app"
    phone = await open_phone(node, work, "bench-setup")
    run.version = phone.version
    try:
        for i in range(attempts):
            call = await phone.eval(f"sautiPhone.call('sip:{NUMBER}@x.invalid')", timeout=20)
            if not call["ok"]:
                run.failed.append(f"call {i}: {call}")
                await asyncio.sleep(0.5)
                continue
            try:
                t = await wait_first_audio(phone)
            except TimeoutError as e:
                run.failed.append(f"call {i}: {e}")
                await phone.eval("sautiPhone.hangup()")
                continue
            if hangup == "page":
                h = await phone.eval("sautiPhone.hangup()")
                if not h.get("ok"):
                    run.failed.append(f"hangup {i}: {h}")
            else:  # the app's hangup: the worker's BYE
                await phone.eval("sautiPhone.ended()", timeout=15)
            run.invite_sent_ms.append(t["invite_sent_ms"])
            run.answered_ms.append(t["answered_ms"])
            run.first_audio_ms.append(t["first_audio_ms"])
            run.invite_200_ms.append(t["answered_ms"] - t["invite_sent_ms"])
            run.invite_audio_ms.append(t["first_audio_ms"] - t["invite_sent_ms"])
            await asyncio.sleep(0.2)  # the worker frees the slot
        await phone.eval("sautiPhone.stop()")
    finally:
        app.short = False
        await phone.close()
    say(f"browser: {len(run.answered_ms)}/{attempts} calls, answered p50 "
        f"{pct(run.answered_ms, 50):.1f} ms, INVITE->200 p50 {pct(run.invite_200_ms, 50):.1f} "
        f"ms, first audio p50 {pct(run.first_audio_ms, 50):.1f} ms")
    return run


@dataclass
class SipRun:
    invite_200_ms: list[float] = field(default_factory=list)
    invite_100_ms: list[float] = field(default_factory=list)
    invite_audio_ms: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _loud(payload: bytes, law: str) -> bool:
    x = g711_decode(payload, law).astype(np.float64)  # type: ignore[arg-type]
    n = 40  # 5 ms at 8 kHz, as the page's slices
    for i in range(0, len(x) - n + 1, n):
        if math.sqrt(2 * float(np.mean(x[i:i + n] ** 2))) > 10 ** (FIRST_AUDIO_DBFS / 20):
            return True
    return False


async def plain_call(front_port: int) -> tuple[float, float, float]:
    """One call from a raw UDP UAC: (INVITE->100, INVITE->200, INVITE->first loud RTP) ms."""
    loop = asyncio.get_running_loop()
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tasks: list[asyncio.Task[None]] = []
    try:
        sip.bind(("127.0.0.1", 0))
        sip.setblocking(False)
        rtp_port = free_port_block(2, 45000, 55000) // 2 * 2
        rtp.bind(("127.0.0.1", rtp_port))
        rtp.setblocking(False)
        lport = sip.getsockname()[1]
        sdp = ("v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               f"m=audio {rtp_port} RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n"
               "a=rtpmap:8 PCMA/8000\r\na=ptime:20\r\na=sendrecv\r\n")
        call_id, msg = invite(front_port, lport, body=sdp)
        audio_at: asyncio.Future[float] = loop.create_future()

        async def rtp_reader() -> None:
            while True:
                data = await loop.sock_recv(rtp, 2048)
                at = time.perf_counter()
                if len(data) > 12 and (data[1] & 0x7F) in (0, 8) and _loud(
                        data[12:], "PCMU" if (data[1] & 0x7F) == 0 else "PCMA"):
                    if not audio_at.done():
                        audio_at.set_result(at)
                    return

        reader = loop.create_task(rtp_reader())
        tasks.append(reader)
        t0 = time.perf_counter()
        sip.sendto(msg, ("127.0.0.1", front_port))
        t100 = t200 = math.nan
        ok: str | None = None
        deadline = t0 + 10
        retrans, next_rt = 0.5, t0 + 0.5
        while ok is None:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError("no 200 to INVITE")
            if math.isnan(t100) and now >= next_rt:
                sip.sendto(msg, ("127.0.0.1", front_port))
                retrans *= 2
                next_rt = now + retrans
            try:
                data = await asyncio.wait_for(loop.sock_recv(sip, 70000),
                                              min(deadline, next_rt) - now)
            except TimeoutError:
                continue
            at = time.perf_counter()
            text = data.decode(errors="replace")
            if call_id not in text or not re.search(r"^CSeq:\s*1 INVITE", text, re.M | re.I):
                continue
            m = re.match(r"SIP/2\.0 (\d{3})", text)
            if not m:
                continue
            code = int(m.group(1))
            if code == 100 and math.isnan(t100):
                t100 = at
            elif code == 200:
                t200, ok = at, text
            elif code >= 300:
                raise RuntimeError(f"INVITE answered {text.splitlines()[0]}")
        ack, bye = ack_and_bye(ok, "127.0.0.1", lport, "UDP")
        sip.sendto(ack, ("127.0.0.1", front_port))
        try:
            t_audio = await asyncio.wait_for(audio_at, 10)
        finally:
            reader.cancel()
        sip.sendto(bye, ("127.0.0.1", front_port))
        end = time.perf_counter() + 5
        while time.perf_counter() < end:  # the BYE's 200
            try:
                data = await asyncio.wait_for(loop.sock_recv(sip, 70000),
                                              end - time.perf_counter())
            except TimeoutError:
                break
            if re.search(rb"^CSeq:\s*2 BYE", data, re.M | re.I) and data.startswith(b"SIP/2.0 2"):
                break
        return (t100 - t0) * 1000, (t200 - t0) * 1000, (t_audio - t0) * 1000
    finally:
        for t in tasks:
            t.cancel()
        sip.close()
        rtp.close()


async def sip_calls(node: Node, attempts: int) -> SipRun:
    run = SipRun()
    for i in range(attempts):
        try:
            t100, t200, ta = await plain_call(node.gw.sip_port)
        except (TimeoutError, RuntimeError) as e:
            run.failed.append(f"call {i}: {e}")
            continue
        run.invite_100_ms.append(t100)
        run.invite_200_ms.append(t200)
        run.invite_audio_ms.append(ta)
        await asyncio.sleep(0.2)
    say(f"plain SIP: {len(run.invite_200_ms)}/{attempts} calls, INVITE->200 p50 "
        f"{pct(run.invite_200_ms, 50):.1f} ms, first audio p50 "
        f"{pct(run.invite_audio_ms, 50):.1f} ms")
    return run


# -- 3. rtpengine CPU per WebRTC call -------------------------------------------------------
ROWS = ("rtpengine", "workers", "kamailio", "chromium")


def psutil_cpu(ps: list[psutil.Process]) -> float:
    """user + system seconds (10 ms ticks), a cross-check of cpu_of()."""
    total = 0.0
    for p in ps:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class Window:
    s: float = 0.0  # wall seconds
    cpu: dict[str, float] = field(default_factory=dict)  # process group -> CPU seconds
    rtpengine_ticks_s: float = 0.0  # psutil's figure for rtpengine
    machine_busy_pct: float = 0.0


@dataclass
class CpuRun:
    k: int = 0
    hold_s: float = 0.0
    up: int = 0
    idle: Window = field(default_factory=Window)
    calls: Window = field(default_factory=Window)
    notes: list[str] = field(default_factory=list)


async def measure(groups: dict[str, list[psutil.Process]], seconds: float) -> Window:
    def snap() -> tuple[dict[str, float], float, tuple[float, float], float]:
        return ({g: cpu_of(groups[g]) for g in ROWS}, psutil_cpu(groups["rtpengine"]),
                machine(), time.monotonic())

    a = await asyncio.to_thread(snap)
    await asyncio.sleep(seconds)
    b = await asyncio.to_thread(snap)
    return Window(b[3] - a[3], {g: b[0][g] - a[0][g] for g in ROWS}, b[1] - a[1],
                  100 * (b[2][0] - a[2][0]) / max(1e-9, b[2][1] - a[2][1]))


def groups_of(node: Node, phones: list[BrowserPhone]) -> dict[str, list[psutil.Process]]:
    groups: dict[str, list[psutil.Process]] = dict(node.procs())
    chromium: list[psutil.Process] = []
    for ph in phones:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(ph.proc.pid)
            chromium += [root, *root.children(recursive=True)]
        chromium += [p for p in ph._descendants if p.pid not in {c.pid for c in chromium}]
    groups["chromium"] = chromium
    return groups


async def cpu_phase(node: Node, work: Path, app: VoiceApp, k: int, hold_s: float) -> CpuRun:
    run = CpuRun(k=k, hold_s=hold_s)
    app.loop = max(2, math.ceil((hold_s + 30) / 5))
    phones: list[BrowserPhone] = []
    try:
        for i in range(k):
            phones.append(await open_phone(node, work, f"bench-cpu{i}"))
        groups = groups_of(node, phones)
        if not groups["rtpengine"]:
            raise RuntimeError("no rtpengine child of the node")
        await asyncio.sleep(1.0)
        run.idle = await measure(groups, hold_s)
        say(f"cpu: idle rtpengine {1000 * run.idle.cpu['rtpengine']:.1f} ms over "
            f"{run.idle.s:.1f} s; {k} calls")

        calls = await asyncio.gather(*(p.eval(f"sautiPhone.call('sip:{NUMBER}@x.invalid')",
                                              timeout=30) for p in phones))
        bad = [c for c in calls if not c["ok"]]
        if bad:
            run.notes.append(f"calls not answered: {bad}")
        up = [p for p, c in zip(phones, calls, strict=True) if c["ok"]]
        await asyncio.gather(*(wait_first_audio(p, 15) for p in up))
        run.up = len(up)
        again = groups_of(node, phones)
        if {p.pid for p in again["rtpengine"] + again["workers"]} != {
                p.pid for p in groups["rtpengine"] + groups["workers"]}:
            run.notes.append("the node's processes changed between the windows (a restart?)")
        groups = again
        run.calls = await measure(groups, hold_s)
        states = await asyncio.gather(*(p.eval("sautiPhone.state()") for p in up))
        still = sum(1 for s in states if s["inCall"])
        if still != len(up):
            run.notes.append(f"only {still} of {len(up)} calls still up at the window's end")
        run.notes.append("sampled: rtpengine pid " + ", ".join(
            str(p.pid) for p in groups["rtpengine"]) + f"; {len(groups['workers'])} worker, "
            f"{len(groups['kamailio'])} kamailio and {len(groups['chromium'])} node/Chromium "
            "processes")
        run.notes.append(
            "rtpengine by psutil (user+system, 10 ms ticks) for comparison: idle "
            f"{1000 * run.idle.rtpengine_ticks_s / max(1e-9, run.idle.s):.2f} ms/s, in calls "
            f"{1000 * run.calls.rtpengine_ticks_s / max(1e-9, run.calls.s):.2f} ms/s")
        await asyncio.gather(*(p.eval("sautiPhone.hangup()") for p in up))
        say(f"cpu: {run.up} calls, rtpengine {1000 * run.calls.cpu['rtpengine']:.1f} ms over "
            f"{run.calls.s:.1f} s, workers {1000 * run.calls.cpu['workers']:.1f} ms")
        await asyncio.gather(*(p.eval("sautiPhone.stop()") for p in phones))
    finally:
        await asyncio.gather(*(p.close() for p in phones), return_exceptions=True)
        app.loop = 1
    return run


# -- the report -----------------------------------------------------------------------------
def row(name: str, xs: list[float]) -> str:
    if not xs:
        return f"| {name} | - | - | - | - | 0 |"
    return (f"| {name} | {pct(xs, 50):.1f} | {pct(xs, 90):.1f} | {pct(xs, 99):.1f} | "
            f"{max(xs):.1f} | {len(xs)} |")


def report(args: argparse.Namespace, reg: RegisterRun | None, br: BrowserRun | None,
           sp: SipRun | None, cpu: CpuRun | None, elapsed: float, command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    lines = [f"# Browser calling (WebRTC) on one node, {datetime.now():%Y-%m-%d %H:%M}", "",
             f"Commit {commit}, {psutil.cpu_count()} cores, Python {sys.version.split()[0]}, "
             f"load average {os.getloadavg()[0]:.2f} at the end; run {elapsed / 60:.1f} min"
             + (f"; Chromium {br.version}" if br and br.version else "") + ".",
             f"Command: `{command}`", ""]
    head = ["| figure (ms) | p50 | p90 | p99 | max | n |", "|---|---|---|---|---|---|"]
    if reg is not None:
        ratio = pct(reg.register_ms, 50) / max(1e-9, pct(reg.options_ms, 50))
        extra = pct(reg.register_ms, 50) - pct(reg.options_ms, 50)
        ok = reg.register_ms and pct(reg.register_ms, 99) <= 50
        lines += ["## 1. REGISTER round trip (SIP over WebSocket to the front, one socket; "
                  f"{WARMUP} warm-ups of each not counted)", "", *head,
                  row("REGISTER with a token (front + token check over http_client)",
                      reg.register_ms),
                  row("OPTIONS, same socket (Kamailio answers itself)", reg.options_ms), "",
                  f"REGISTER / OPTIONS at p50: {ratio:.1f}x (+{extra:.2f} ms: the token check "
                  f"and usrloc save). Goal <= 50 ms: "
                  f"**{'met' if ok else 'not met'}** (p99 {pct(reg.register_ms, 99):.1f} ms)."
                  + (f" Failed: {reg.failed[:5]}" if reg.failed else ""), ""]
    if br is not None or sp is not None:
        lines += ["## 2. Call set-up, sequential calls (voice app: play a 1209 Hz WAV, then "
                  "hang up; the caller hangs up on first audio)", "", *head]
        if br is not None:
            lines[-4] = lines[-4].replace("the caller hangs up on first audio",
                                          f"the browser's calls end by the {args.hangup}'s "
                                          "hangup, the plain ones by the caller's on first "
                                          "audio")
            lines += [row("browser: call() -> INVITE on the wire (getUserMedia, offer, ICE "
                          "gathering)", br.invite_sent_ms),
                      row("browser: call() -> 200 (answered_ms)", br.answered_ms),
                      row("browser: call() -> first audio in the page (first_audio_ms)",
                          br.first_audio_ms),
                      row("browser: INVITE -> 200 (answered - invite_sent)", br.invite_200_ms),
                      row("browser: INVITE -> first audio", br.invite_audio_ms)]
        if sp is not None:
            lines += [row("plain SIP (UDP, to the front): INVITE -> 100", sp.invite_100_ms),
                      row("plain SIP: INVITE -> 200", sp.invite_200_ms),
                      row("plain SIP: INVITE -> first loud RTP packet", sp.invite_audio_ms)]
        lines.append("")
        if br is not None and sp is not None and br.invite_200_ms and sp.invite_200_ms:
            d200 = pct(br.invite_200_ms, 50) - pct(sp.invite_200_ms, 50)
            r_audio = pct(br.invite_audio_ms, 50) / max(1e-9, pct(sp.invite_audio_ms, 50))
            lines += [f"WebRTC overhead at p50: INVITE -> 200 "
                      f"{pct(br.invite_200_ms, 50) / max(1e-9, pct(sp.invite_200_ms, 50)):.2f}x "
                      f"the plain call's (+{d200:.1f} ms: the INVITE's token check, rtpengine "
                      "offer and answer, JsSIP); INVITE -> first audio "
                      f"{r_audio:.2f}x "
                      f"(+{pct(br.invite_audio_ms, 50) - pct(sp.invite_audio_ms, 50):.1f} ms: "
                      "also ICE, DTLS, Chromium's jitter buffer and the page's 1024-sample "
                      "capture block).", ""]
        for run, name in ((br, "browser"), (sp, "plain SIP")):
            if run is not None and run.failed:
                lines.append(f"- {name} failures ({len(run.failed)}): {run.failed[:5]}")
        lines.append("")
    if cpu is not None:
        up = max(1, cpu.up)
        lines += [f"## 3. CPU per WebRTC call ({cpu.up} of {cpu.k} concurrent browser calls, "
                  f"one Chromium each, held; windows of {cpu.hold_s:g} s; on-CPU time from "
                  "schedstat)", "",
                  "| process | idle (K registered, no call): ms/s | in calls: ms/s | ms per "
                  "call-second | (in calls - idle) per call-second | % of one core per call |",
                  "|---|---|---|---|---|---|"]
        names = {"rtpengine": "rtpengine", "workers": "workers (all)",
                 "kamailio": "kamailio (all processes)",
                 "chromium": f"Chromium + driver (all {cpu.k})"}
        rate = {}
        for g in ROWS:
            i_ms = 1000 * cpu.idle.cpu.get(g, 0.0) / max(1e-9, cpu.idle.s)
            b_ms = 1000 * cpu.calls.cpu.get(g, 0.0) / max(1e-9, cpu.calls.s)
            rate[g] = (i_ms, b_ms)
            lines.append(f"| {names[g]} | {i_ms:.2f} | {b_ms:.2f} | {b_ms / up:.2f} | "
                         f"{(b_ms - i_ms) / up:.2f} | {b_ms / up / 10:.2f} |")
        i_ms, b_ms = rate["rtpengine"]
        lines += ["", f"**rtpengine: {b_ms / up:.2f} ms CPU per WebRTC call-second "
                  f"({b_ms / up / 10:.2f}% of one core per call; idle {i_ms:.2f} ms/s)**; "
                  f"the workers {rate['workers'][1] / up:.2f} ms per call-second. Machine busy "
                  f"{cpu.calls.machine_busy_pct:.0f}% in calls, {cpu.idle.machine_busy_pct:.0f}% "
                  "in the idle window (anything else on the machine included).", ""]
        lines += [f"- {n}" for n in cpu.notes]
    return "\n".join(lines) + "\n"


async def amain(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-webrtc-"))
    app = VoiceApp()
    await app.start()
    t0 = time.monotonic()
    reg = br = sp = cpu = None
    node: Node | None = None
    try:
        node = await start_node(work, app, args.concurrent)
        say(f"node up: front {node.gw.sip_port}, ws {node.ws_url}, api {node.api}")
        await asyncio.sleep(2.0)  # the front's first probes of the workers
        if "register" in args.phases:
            reg = await register_phase(node, args.attempts)
        if "setup" in args.phases:
            # plain calls first, then the browser's (each phase on its own terms)
            sp = await sip_calls(node, args.attempts)
            br = await browser_calls(node, work, app, args.attempts, args.hangup)
        if "cpu" in args.phases:
            if "setup" in args.phases:  # a fresh node for the CPU phase
                await asyncio.to_thread(node.gw.stop)
                (work / "cpu").mkdir()
                node = await start_node(work / "cpu", app, args.concurrent)
                await asyncio.sleep(2.0)
            cpu = await cpu_phase(node, work, app, args.concurrent, args.hold_s)
    finally:
        if node is not None:
            await asyncio.to_thread(node.gw.stop)
        await app.stop()
    command = ("PYTHONPATH=. .venv/bin/python bench/webrtc.py "
               + " ".join(shlex.quote(a) for a in sys.argv[1:])).rstrip()
    text = report(args, reg, br, sp, cpu, time.monotonic() - t0, command)
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)  # noqa: ASYNC240
        print(f"written {args.out}")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="attempts 5, concurrent 2, hold 5 s")
    ap.add_argument("--attempts", type=int, default=50)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--hold-s", type=float, default=20.0)
    ap.add_argument("--phases", default="register,setup,cpu")
    ap.add_argument("--hangup", choices=("app", "page"), default="page",
                    help="who ends the browser's set-up calls: the page (sautiPhone.hangup() "
                         "on first audio; default) or the voice app (a 0.6 s tone, then the "
                         "worker's BYE)")
    ap.add_argument("--out", default=None,
                    help="markdown report (default bench/results/webrtc-DATE.md; none on --quick"
                         " unless given)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args()
    if args.quick:
        args.attempts, args.concurrent, args.hold_s = 5, 2, 5.0
    if args.out is None:
        args.out = "" if args.quick else str(RESULTS / f"webrtc-{datetime.now():%Y-%m-%d}.md")
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
