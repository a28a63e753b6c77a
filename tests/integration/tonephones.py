"""`PhoneFarm`: an async handle on a tonephone_proc subprocess, and the `phone_farm` fixture.

    farm = await phone_farm(behaviours={"+254711000001": {"do": "answer", "tone": 941}})
    cid = await farm.call("sip:+254700000001@127.0.0.1:5060", 697)
    await farm.wait(cid, "answered")
    ...
    x, rate = farm.recording(cid)          # what that phone heard so far
    assert tones.heard(x, rate, start_s=farm.offset(cid, t_bridged)) == {941}

Every phone plays its own tone and records what it receives (see tonephone_proc for the UAS
behaviours and the events). Several farms may run at once: each has its own SIP port and RTP
range, found free on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.demo import free_port, free_port_block
from tests.tones import Samples, read_wav

ROOT = Path(__file__).resolve().parents[2]
RTP_RANGE = 40
_names = itertools.count(1)


class FarmError(Exception):
    pass


class PhoneFarm:
    def __init__(self, workdir: Path, *, behaviours: dict[str, dict[str, Any]] | None = None,
                 tone: int = 697, name: str | None = None) -> None:
        self.name = name or f"farm{next(_names)}"
        self.dir = workdir / self.name
        self.behaviours = behaviours or {}
        self.tone = tone
        self.sip_port = 0
        self.pid = 0
        self.events: list[dict[str, Any]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._req = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Condition()
        self._stderr: Path = self.dir / "stderr.log"

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, timeout: float = 10.0) -> PhoneFarm:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sip_port = free_port(socket.SOCK_DGRAM, both=True)
        spec = {"sip_port": self.sip_port, "rtp_port": free_port_block(RTP_RANGE),
                "rtp_range": RTP_RANGE, "dir": str(self.dir), "tone": self.tone,
                "behaviours": self.behaviours}
        err = self._stderr.open("wb")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.tonephone_proc", json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
            cwd=ROOT)
        err.close()
        self._reader = asyncio.ensure_future(self._read())
        ready = await self.wait_event(lambda e: e["ev"] == "ready", timeout)
        self.pid = int(ready["pid"])
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send({"op": "stop"}), 2)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
        self._proc = None

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace") if self._stderr.exists() else ""

    # -- addresses ------------------------------------------------------------------------
    def uri(self, user: str) -> str:
        """A SIP URI reaching this farm as `user` (its behaviour is chosen by `user`)."""
        return f"sip:{user}@127.0.0.1:{self.sip_port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.sip_port}"

    # -- commands -------------------------------------------------------------------------
    async def call(self, uri: str, tone_hz: int, *, from_user: str | None = None,
                   headers: dict[str, str] | None = None) -> str:
        """Place a call that plays `tone_hz`; its id (events carry it)."""
        r = await self._send({"op": "call", "uri": uri, "tone": tone_hz, "from_user": from_user,
                              "headers": headers})
        return str(r["id"])

    async def hangup(self, cid: str, code: int = 603) -> None:
        await self._send({"op": "hangup", "id": cid, "code": code})

    async def send_dtmf(self, cid: str, digits: str) -> None:
        await self._send({"op": "dtmf", "id": cid, "digits": digits})

    # -- events ---------------------------------------------------------------------------
    async def wait_event(self, pred: Callable[[dict[str, Any]], bool],
                         timeout: float = 10.0, nth: int = 0) -> dict[str, Any]:
        """The `nth` (0: first) event since the farm started matching `pred`, waiting up to
        `timeout` for it."""
        async def find() -> dict[str, Any]:
            async with self._changed:
                while True:
                    found = [e for e in self.events if pred(e)]
                    if len(found) > nth:
                        return found[nth]
                    if self._proc is None or self._reader is None or self._reader.done():
                        raise FarmError(f"{self.name} exited:\n{self.stderr()[-3000:]}")
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise FarmError(f"{self.name}: no such event in {timeout}s; events: "
                            f"{self.events[-20:]}") from None

    async def wait(self, cid: str, ev: str, timeout: float = 10.0) -> dict[str, Any]:
        """Event `ev` (incoming, early, media, answered, dtmf, disconnected) of call `cid`."""
        return await self.wait_event(lambda e: e["ev"] == ev and e.get("id") == cid, timeout)

    async def incoming(self, timeout: float = 10.0, *, user: str | None = None,
                       nth: int = 0) -> dict[str, Any]:
        """The `nth` incoming call (of `user` if given): {"id", "user", "request_uri", "from"}."""
        return await self.wait_event(
            lambda e: e["ev"] == "incoming" and (user is None or e["user"] == user),
            timeout, nth)

    def of(self, cid: str, ev: str) -> dict[str, Any] | None:
        """The event `ev` of call `cid` if it came (no wait)."""
        return next((e for e in self.events if e["ev"] == ev and e.get("id") == cid), None)

    # -- recordings -----------------------------------------------------------------------
    def recording(self, cid: str) -> tuple[Samples, int]:
        """What phone `cid` received so far (or all of it once disconnected)."""
        media = self.of(cid, "media")
        if media is None:
            raise FarmError(f"{cid} has no media (no recording)")
        return read_wav(media["wav"])

    def offset(self, cid: str, wall: float) -> float:
        """Seconds into `cid`'s recording of wall-clock time `wall` (time.time())."""
        media = self.of(cid, "media")
        if media is None:
            raise FarmError(f"{cid} has no media")
        return max(0.0, wall - float(media["t0"]))

    # -- plumbing -------------------------------------------------------------------------
    async def _send(self, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        if self._proc is None or self._proc.stdin is None:
            raise FarmError(f"{self.name} is not running")
        req = next(self._req)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[req] = fut
        self._proc.stdin.write((json.dumps({**msg, "req": req}) + "\n").encode())
        await self._proc.stdin.drain()
        try:
            r = await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(req, None)
        if not r.get("ok"):
            raise FarmError(f"{self.name} {msg.get('op')}: {r.get('error')}")
        return r

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while True:
                line = await self._proc.stdout.readline()
                if not line:
                    return
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if e.get("ev") == "reply":
                    fut = self._replies.get(e.get("req"))
                    if fut is not None and not fut.done():
                        fut.set_result(e)
                    continue
                self.events.append(e)
                async with self._changed:
                    self._changed.notify_all()
        finally:
            for fut in self._replies.values():
                if not fut.done():
                    fut.set_exception(FarmError(f"{self.name} exited"))
            async with self._changed:
                self._changed.notify_all()


FarmFactory = Callable[..., Awaitable[PhoneFarm]]


@pytest.fixture
async def phone_farm(tmp_path: Path) -> AsyncIterator[FarmFactory]:
    """`await phone_farm(behaviours=..., tone=...)` starts a farm; all are stopped after."""
    farms: list[PhoneFarm] = []

    async def make(**kw: Any) -> PhoneFarm:
        farm = PhoneFarm(tmp_path, **kw)
        farms.append(farm)
        return await farm.start()

    yield make
    await asyncio.gather(*(f.stop() for f in farms), return_exceptions=True)
