"""Real parts on loopback: a gateway process, a voice app, an events receiver, a pjsua2 phone."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.demo import EventReceiver, free_port
from tests.seed_receiver import verify_signature

ROOT = Path(__file__).resolve().parents[2]
_rtp_blocks = itertools.count(0)
NUMBER = "+254700000001"
CALLER = "+254722000001"


def rtp_block() -> int:
    """A distinct RTP port range per gateway started in this test process."""
    return 32000 + 100 * (next(_rtp_blocks) % 200) + 200 * (os.getpid() % 8)


@dataclass
class VoiceApp:
    """A customer's voice app: answers each request with the next document from `script`."""

    secret: str
    script: Callable[[web.Request, dict[str, str]], Any] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    base_url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            verify_signature(raw, request.headers.get("X-Sautikit-Signature", ""), self.secret)
            sig_ok = True
        except Exception:
            sig_ok = False
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.requests.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "method": request.method,
                "form": form,
                "signature_ok": sig_ok,
                "content_type": request.content_type,
                "at": time.time(),
            }
        )
        assert self.script is not None, "the test set no script"
        reply = self.script(request, form)
        if asyncio.iscoroutine(reply):
            reply = await reply
        if isinstance(reply, web.StreamResponse):
            return reply
        return web.json_response(reply)


@pytest.fixture
async def voice_app() -> AsyncIterator[VoiceApp]:
    app_obj = VoiceApp(secret=secrets.token_hex(8))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_obj.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    app_obj.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield app_obj
    await runner.cleanup()


@pytest.fixture
async def receiver(voice_app: VoiceApp) -> AsyncIterator[tuple[EventReceiver, str]]:
    # A number's events_url is signed with its webhook_secret, like its voice callbacks.
    rec = EventReceiver(secret=voice_app.secret, verifier=verify_signature)
    runner, url = await rec.start()
    yield rec, url
    await runner.cleanup()


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    sip_port: int
    api_port: int
    storage: Path
    config: Path
    log: Path

    @property
    def uri(self) -> str:
        return f"sip:{NUMBER}@127.0.0.1:{self.sip_port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def worker_pids(gw: Gateway) -> dict[int, int]:
    """worker index -> pid of the node's running workers: the supervisor's descendants whose
    command line is a worker's (spawned by the supervisor, or forked by its fork server, which
    retitles each child `... gateway.workers.worker --index N ...`)."""
    import re

    import psutil

    pids: dict[int, int] = {}
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(gw.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                m = re.search(r"gateway\.workers\.worker --index (\d+) ", " ".join(p.cmdline()))
                if m:
                    pids[int(m.group(1))] = p.pid
    return pids


def write_config(
    tmp: Path,
    *,
    voice_url: str,
    app_secret: str,
    events_url: str | None,
    control_plane: tuple[str, str] | None = None,
    extra: str = "",
    sip_port: int | None = None,
    api_port: int | None = None,
    workers: str = "count = 1\ncalls_per_worker = 4",
    kamailio: str = 'mode = "off"',
) -> Path:
    sip_port = sip_port or free_port(both=True)
    api_port = api_port or free_port()
    cp = ""
    if control_plane:
        cp = f'[control_plane]\nevents_url = "{control_plane[0]}"\nsecret = "{control_plane[1]}"\n'
    number_events = f'events_url = "{events_url}"\n' if events_url else ""
    text = f"""
[sip]
listen = "127.0.0.1:{sip_port}"
[api]
listen = "127.0.0.1:{api_port}"
token = "test-token"
{cp}
[callbacks]
timeout_s = 2
allow_http = true
allow_private = true
[storage]
dir = "{tmp / "var"}"
[media]
rtp_port_start = {rtp_block()}
[workers]
{workers}
[kamailio]
{kamailio}
[log]
level = "INFO"
{extra}
[[numbers]]
e164 = "{NUMBER}"
number_id = "num_1"
workspace_id = "ws_1"
voice_callback_url = "{voice_url}"
webhook_secret = "{app_secret}"
{number_events}
"""
    path = tmp / "gateway.toml"
    path.write_text(text)
    return path


def sipp_errors(cwd: Path) -> str:
    """What SIPp's -trace_err wrote (unexpected messages and the like)."""
    return "".join(p.read_text(errors="replace") for p in cwd.glob("*_errors.log"))


async def sipp(scenario: Path, port: int, *, calls: int = 1, limit: int = 1, rate: int = 20,
               timeout: float = 60, service: str = NUMBER,
               cwd: Path | None = None,
               args: tuple[str, ...] = ()) -> tuple[int, int, int, str]:
    """Run SIPp as a carrier; (exit code, successful calls, failed calls, tail of its output).

    With `cwd`, SIPp writes its files there and what `-trace_err` logged (unexpected messages)
    is added to the output."""
    trace = ["-trace_err"] if cwd is not None else []
    proc = await asyncio.create_subprocess_exec(
        "sipp", "-sf", str(scenario), f"127.0.0.1:{port}", "-s", service, "-m", str(calls),
        "-l", str(limit), "-r", str(rate), "-i", "127.0.0.1",
        "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port(socket.SOCK_DGRAM) // 2 * 2),
        "-timeout", str(int(timeout)), "-timeout_error", "-nostdin", *trace, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=cwd)
    out_b, _ = await asyncio.wait_for(proc.communicate(), timeout + 15)
    out = out_b.decode(errors="replace")

    def last(label: str) -> int:
        rows = [ln for ln in out.splitlines() if ln.strip().startswith(label)]
        return int(rows[-1].split("|")[-1].split()[0]) if rows else -1

    errors = sipp_errors(cwd) if cwd else ""
    return (proc.returncode or 0, last("Successful call"), last("Failed call"),
            (out[-4000:] + errors)[-6000:])


def start_gateway(config: Path, tmp: Path, timeout: float = 30, *,
                  new_session: bool = False) -> Gateway:
    """A gateway process; `new_session` puts it in its own session, so one killpg ends it
    whole (supervisor, workers, Kamailio)."""
    import tomllib

    cfg = tomllib.loads(config.read_text())
    log = tmp / f"gateway-{int(time.time() * 1000)}.log"
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=new_session,
    )
    gw = Gateway(
        proc,
        int(cfg["sip"]["listen"].rsplit(":", 1)[1]),
        int(cfg["api"]["listen"].rsplit(":", 1)[1]),
        Path(cfg["storage"]["dir"]),
        config,
        log,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"sautikit-gateway ready" in log.read_bytes():
            return gw
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited {proc.returncode}:\n{gw.log_text()}")
        time.sleep(0.05)
    gw.stop()
    raise AssertionError(f"gateway not ready in {timeout}s:\n{gw.log_text()}")


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(**kw: Any) -> Gateway:
        d = tmp_path / f"gw{len(started)}"
        d.mkdir()
        gw = start_gateway(write_config(d, **kw), d)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
async def phone(phone_endpoint: Any) -> AsyncIterator[Any]:
    """The session's endpoint, with what a test left up hung up after it: a failed test's call
    must not hold the slots the next test counts on."""
    yield phone_endpoint
    left = [c for c in list(phone_endpoint.calls.values()) if c.end is None]
    for call in left:
        call.reject_now(200)
    if left:
        logging.getLogger(__name__).warning("hung up %d call(s) a test left on the phone",
                                            len(left))
        await asyncio.sleep(0.5)  # their BYEs (or CANCELs) go out before the next test


@pytest.fixture(scope="session")
async def phone_endpoint() -> AsyncIterator[Any]:
    """One pjsua2 endpoint per test process (pjsua2 allows one), used as the carrier."""
    from media.endpoint import EndpointConfig, SipEndpoint

    loop = asyncio.get_running_loop()
    ep = SipEndpoint(
        loop,
        EndpointConfig(
            sip_host="127.0.0.1",
            sip_port=free_port(socket.SOCK_DGRAM, both=True),
            transports=("udp",),
            rtp_port=28000 + 40 * (os.getpid() % 20),
            rtp_port_range=40,
            max_calls=4,
        ),
    )
    ep.start()
    yield ep
    ep.stop()


def final_events(events: list[Any], call_id: str | None = None) -> list[Any]:
    return [
        e
        for e in events
        if e.kind in ("call.completed", "call.failed")
        and (call_id is None or e.body["data"]["call_id"] == call_id)
    ]


def dump(events: list[Any]) -> str:
    return json.dumps([e.body for e in events], indent=1)
