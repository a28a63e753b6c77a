"""A real WebSocket agent for `stream` / `aiAgent` tests: an aiohttp server on 127.0.0.1.

    agent = await WsAgent(secret=voice_app.secret).start()
    agent.script = my_script            # async def my_script(s: AgentSession) -> None
    url = agent.url("/agent")           # ws://127.0.0.1:PORT/agent (the `stream` verb's url)
    s = await agent.session(0)          # the first connection, once upgraded
    pre = await s.wait_preamble()       # the first text frame, parsed
    await s.send_pcm(pcm, 8000, chunk_ms=20, paced=True)
    await s.play_audio(pcm, 8000, kind="wav"); await s.kill_audio(); await s.mark("m1")
    at, msg = await s.wait_event("mark")

The server speaks the `audio.drachtio.org` subprotocol as a jambonz `listen` server does:
it negotiates the subprotocol (and records what the client asked for), keeps the first text
frame (the preamble) and every later message with its arrival time (`time.monotonic()` and
`time.time()`), keeps binary frames (L16 PCM) with their arrival times, and lets the test
script what it sends back: binary L16 at any rate, bursty or paced at real time in N-ms chunks;
`playAudio` (raw or wav, base64), `killAudio`, `mark`, `clearMarks`, `disconnect`, `handover`;
a close with any code. `mode` "refuse" answers the upgrade with an HTTP error; `echo` sends
every binary frame straight back (benchmarks). `SilentServer` accepts TCP and never answers
the upgrade. The same aiohttp app also takes the stream's `statusCallback` POSTs (`/status`),
checking their signatures with the number's webhook secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from tests.seed_receiver import verify_signature

SUBPROTOCOL = "audio.drachtio.org"
Script = Callable[["AgentSession"], Awaitable[None]]


# -- audio helpers ----------------------------------------------------------------------------
def l16(x: Any) -> bytes:
    """Float samples in [-1, 1] -> 16-bit little-endian PCM."""
    y = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), -1.0, 32767 / 32768)
    return bytes((np.round(y * 32768.0)).astype("<i2").tobytes())


def from_l16(pcm: bytes, channels: int = 1) -> Any:
    """16-bit LE PCM -> float samples (one row per channel when `channels` > 1)."""
    n = len(pcm) // (2 * channels) * 2 * channels
    x = np.frombuffer(pcm[:n], dtype="<i2").astype(np.float64) / 32768.0
    return x if channels == 1 else x.reshape(-1, channels).T


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def to_wall(mono: float) -> float:
    """time.time() of a past time.monotonic() reading (to place it in a phone's recording)."""
    return time.time() - (time.monotonic() - mono)


# -- what arrived -----------------------------------------------------------------------------
@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    data: Any  # parsed JSON (text frames) or bytes (binary frames)


@dataclass
class StatusPost:
    at: float
    body: dict[str, Any]
    headers: dict[str, str]
    signature_ok: bool


class AgentSession:
    """One upgraded connection: what it received, and what the test sends on it."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, echo: bool) -> None:
        self.request = request
        self.ws = ws
        self.path = request.path
        self.query = dict(request.query)
        self.headers = dict(request.headers)
        self.requested_protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        self.protocol = ws.ws_protocol
        self.opened_at = time.monotonic()
        self.opened_wall = time.time()
        self.echo = echo
        self.texts: list[Received] = []  # every text frame, the preamble first
        self.frames: list[Received] = []  # binary frames
        self.bad_text: list[str] = []  # text frames that were not JSON objects
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self.closed_wall: float | None = None
        self.closed_by: Literal["us", "peer"] | None = None
        self.sent: list[tuple[float, str]] = []  # (monotonic, what) of each control we sent
        self._changed = asyncio.Condition()

    # -- received ---------------------------------------------------------------------------
    @property
    def preamble(self) -> dict[str, Any] | None:
        return self.texts[0].data if self.texts else None

    def events(self, name: str) -> list[Received]:
        """Text frames after the preamble whose top-level "event" is `name`."""
        return [r for r in self.texts[1:] if isinstance(r.data, dict)
                and r.data.get("event") == name]

    def pcm(self) -> bytes:
        return b"".join(f.data for f in self.frames)

    async def _wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        async def go() -> Any:
            async with self._changed:
                while True:
                    got = pred()
                    if got:
                        return got
                    if self.closed.is_set():
                        raise AssertionError(f"socket closed ({self.close_code}) before {what}; "
                                             f"texts: {[t.data for t in self.texts][-10:]}")
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(go(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {what} in {timeout}s; texts: "
                                 f"{[t.data for t in self.texts][-10:]}, "
                                 f"{len(self.frames)} frames") from None

    async def wait_preamble(self, timeout: float = 10) -> dict[str, Any]:
        await self._wait(lambda: self.texts, timeout, "preamble")
        pre = self.preamble
        assert isinstance(pre, dict), pre
        return pre

    async def wait_event(self, name: str, timeout: float = 10, nth: int = 0,
                         pred: Callable[[dict[str, Any]], bool] | None = None) -> Received:
        """The `nth` text frame with event `name` (and matching `pred`)."""
        def found() -> Received | None:
            hits = [r for r in self.events(name) if pred is None or pred(r.data)]
            return hits[nth] if len(hits) > nth else None
        got: Received = await self._wait(found, timeout, f"{name!r} event #{nth}")
        return got

    async def wait_frames(self, n: int, timeout: float = 10) -> list[Received]:
        await self._wait(lambda: len(self.frames) >= n, timeout, f"{n} binary frames")
        return self.frames[:n]

    async def wait_closed(self, timeout: float = 10) -> int | None:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"socket still open after {timeout}s") from None
        return self.close_code

    async def _note(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- sending ----------------------------------------------------------------------------
    async def send_json(self, obj: dict[str, Any]) -> float:
        """Send a text frame; its send time (monotonic, just before the write)."""
        t = time.monotonic()
        await self.ws.send_str(json.dumps(obj))
        self.sent.append((t, str(obj.get("type"))))
        return t

    async def send_pcm(self, pcm: bytes, rate: int, *, chunk_ms: float = 20,
                       paced: bool = False, lead_ms: float = 0) -> tuple[float, float]:
        """Send L16 `pcm` (at `rate`) as binary frames of `chunk_ms` each; paced: chunk i is
        sent at start + i * chunk_ms (after `lead_ms` of head start sent at once), else all
        at once (a TTS burst). (monotonic time of the first send, of the last send)."""
        step = max(2, int(rate * chunk_ms / 1000) * 2)
        chunks = [pcm[i:i + step] for i in range(0, len(pcm), step)]
        t0 = time.monotonic()
        ahead = int(lead_ms / chunk_ms) if paced else len(chunks)
        last = t0
        for i, c in enumerate(chunks):
            if paced and i >= ahead:
                delay = t0 + (i - ahead) * chunk_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            last = time.monotonic()
            await self.ws.send_bytes(c)
        return t0, last

    async def play_audio(self, pcm: bytes, rate: int, *, kind: Literal["raw", "wav"] = "raw",
                         send_rate: bool = True) -> float:
        content = wav_bytes(pcm, rate) if kind == "wav" else pcm
        data: dict[str, Any] = {"audioContent": base64.b64encode(content).decode(),
                                "audioContentType": kind}
        if send_rate:
            data["sampleRate"] = rate
        return await self.send_json({"type": "playAudio", "data": data})

    async def kill_audio(self) -> float:
        return await self.send_json({"type": "killAudio"})

    async def mark(self, name: str) -> float:
        return await self.send_json({"type": "mark", "data": {"name": name}})

    async def clear_marks(self) -> float:
        return await self.send_json({"type": "clearMarks"})

    async def disconnect(self) -> float:
        return await self.send_json({"type": "disconnect"})

    async def handover(self, data: dict[str, Any] | None = None) -> float:
        msg: dict[str, Any] = {"type": "handover"}
        if data is not None:
            msg["data"] = data
        return await self.send_json(msg)

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self.closed_by = self.closed_by or "us"
        await self.ws.close(code=code, message=message)


class WsAgent:
    """The agent server. `script` runs on every session once it is upgraded (concurrently
    with the receive loop); when it returns the session stays open until the peer closes."""

    def __init__(self, *, secret: str = "", script: Script | None = None,
                 mode: Literal["accept", "refuse"] = "accept", refuse_status: int = 403,
                 echo: bool = False, max_msg_size: int = 8 * 1024 * 1024) -> None:
        self.secret = secret
        self.script = script
        self.mode = mode
        self.refuse_status = refuse_status
        self.echo = echo
        self.max_msg_size = max_msg_size
        self.sessions: list[AgentSession] = []
        self.attempts: list[tuple[float, str]] = []  # (monotonic, path) of every upgrade asked
        self.status: list[StatusPost] = []
        self.script_errors: list[BaseException] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> WsAgent:
        app = web.Application()
        app.router.add_post("/status", self._status)
        app.router.add_post("/status/{tail:.*}", self._status)
        app.router.add_get("/{tail:.*}", self._ws)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        for s in self.sessions:
            if not s.ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(s.ws.close(code=1001), 2)
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, path: str = "/agent") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/status"

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        async def go() -> Any:
            async with self._changed:
                while not (got := pred()):
                    await self._changed.wait()
                return got
        try:
            return await asyncio.wait_for(go(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {what} in {timeout}s (attempts {len(self.attempts)}, "
                                 f"status {[p.body for p in self.status]})") from None

    async def session(self, n: int = 0, timeout: float = 10) -> AgentSession:
        got: AgentSession = await self._wait(
            lambda: self.sessions[n] if len(self.sessions) > n else None, timeout,
            f"session #{n}")
        return got

    async def wait_status(self, event: str, timeout: float = 10) -> StatusPost:
        got: StatusPost = await self._wait(
            lambda: next((p for p in self.status if p.body.get("event") == event), None),
            timeout, f"status POST {event!r}")
        return got

    # -- handlers ---------------------------------------------------------------------------
    async def _status(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            verify_signature(raw, request.headers.get("X-Sautikit-Signature", ""), self.secret)
            ok = True
        except Exception:
            ok = False
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"_raw": raw.decode(errors="replace")}
        self.status.append(StatusPost(time.monotonic(), body, dict(request.headers), ok))
        await self._notify()
        return web.Response(status=200)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.attempts.append((time.monotonic(), request.path))
        await self._notify()
        if self.mode == "refuse":
            return web.Response(status=self.refuse_status, text="refused by the test agent")
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=self.max_msg_size,
                                   autoping=True)
        await ws.prepare(request)
        s = AgentSession(request, ws, self.echo)
        self.sessions.append(s)
        await self._notify()
        script: asyncio.Task[None] | None = None
        if self.script is not None:
            script = asyncio.ensure_future(self._run_script(s))
            self._tasks.add(script)
            script.add_done_callback(self._tasks.discard)
        try:
            async for msg in ws:
                now, wall = time.monotonic(), time.time()
                if msg.type == WSMsgType.BINARY:
                    s.frames.append(Received(now, wall, msg.data))
                    if s.echo:
                        await ws.send_bytes(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except ValueError:
                        s.bad_text.append(msg.data)
                        data = {"_raw": msg.data}
                    s.texts.append(Received(now, wall, data))
                else:
                    continue
                await s._note()
        finally:
            s.close_code = ws.close_code
            s.closed_at, s.closed_wall = time.monotonic(), time.time()
            s.closed_by = s.closed_by or "peer"
            s.closed.set()
            await s._note()
            await self._notify()
            if script is not None and not script.done():
                script.cancel()
        return ws

    async def _run_script(self, s: AgentSession) -> None:
        assert self.script is not None
        try:
            await self.script(s)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, RuntimeError) as e:  # the peer went away mid-send
            if not s.closed.is_set() and not s.ws.closed:
                self.script_errors.append(e)
        except BaseException as e:  # an assertion in the script: the test reports it
            self.script_errors.append(e)


class SilentServer:
    """Accepts TCP connections, reads what the client sends and never answers (a WebSocket
    server that never completes the upgrade)."""

    def __init__(self) -> None:
        self.connections: list[float] = []  # monotonic time of each accept
        self.received: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> SilentServer:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def url(self, path: str = "/agent") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(time.monotonic())
        self._writers.append(writer)
        with contextlib.suppress(Exception):
            while data := await reader.read(4096):
                self.received.append(data)

    async def stop(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Agents:
    """What the `ws_agent` fixture yields: a factory whose servers are all stopped after."""

    made: list[Any] = field(default_factory=list)

    async def agent(self, **kw: Any) -> WsAgent:
        a = await WsAgent(**kw).start()
        self.made.append(a)
        return a

    async def silent(self) -> SilentServer:
        s = await SilentServer().start()
        self.made.append(s)
        return s


@pytest.fixture
async def ws_agents() -> AsyncIterator[Agents]:
    """`await ws_agents.agent(secret=..., script=...)`, `await ws_agents.silent()`."""
    agents = Agents()
    yield agents
    await asyncio.gather(*(a.stop() for a in agents.made), return_exceptions=True)
