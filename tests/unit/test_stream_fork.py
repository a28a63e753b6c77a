"""gateway/streams/fork.py + registry.py against a REAL aiohttp WebSocket server on 127.0.0.1
and a fake audio port (records play/cue/kill/close; the test fires cues and pushes the caller's
frames): the audio.drachtio.org preamble, audio both ways with resampling, the server's
commands, every way a fork ends (and its retries), CallStreams naming/stop/guard/aiAgent, and
signed status callbacks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiohttp import web

from config.settings import AiAgentsSettings, CallbacksSettings, StreamsSettings
from dsl.context import CallEnded, MediaError, StreamEnd, StreamRequest
from gateway.events.signing import SIGNATURE_HEADER, verify
from gateway.streams.fork import (
    DRAIN_SLACK_S,
    MAX_BACKLOG_FRAMES,
    SUBPROTOCOL,
    CallInfo,
    StreamForkRunner,
)
from gateway.streams.registry import CallStreams
from gateway.voice_app import VoiceAppClient

SECRET = "whsec-test-1"
TOKEN = "agent-token-s3cr3t"
FIELDS = {"callId": "call-1", "from": "+254700000001", "to": "+254711000002",
          "direction": "inbound", "callStatus": "in-progress"}
CALL = CallInfo("call-1", "+254700000001", "+254711000002", "inbound", "ws-9", FIELDS)
FAST = StreamsSettings(connect_timeout_s=0.5, retries=2, retry_window_s=1.5)
T = 3.0  # per-step timeout


# -- the fake audio port -------------------------------------------------------------------------
class FakeAudio:
    """An AudioPort: records what the fork asks; cues wait until the test fires them."""

    def __init__(self, channels: int = 1, clock_rate: int = 8000) -> None:
        self.clock_rate = clock_rate
        self.channels = channels
        self.played: list[bytes] = []
        self.cues: list[Callable[[bool], None]] = []
        self.kills = 0
        self.closed = False
        self.accept = True
        self.on_audio: Callable[[bytes], None] | None = None

    def factory(self, on_audio: Callable[[bytes], None]) -> FakeAudio:
        self.on_audio = on_audio
        return self

    def play(self, pcm: bytes) -> bool:
        if not self.accept:
            return False
        self.played.append(pcm)
        return True

    def cue(self, fn: Callable[[bool], None]) -> None:
        self.cues.append(fn)

    def fire(self, played: bool = True) -> None:
        cues, self.cues = self.cues, []
        for fn in cues:
            fn(played)

    def kill(self) -> None:
        self.kills += 1
        self.fire(False)

    def close(self) -> None:
        self.closed = True
        self.fire(False)

    def push(self, frames: int) -> None:
        """The caller's 20 ms frames, as the bridge clock hands them over."""
        assert self.on_audio is not None
        n = self.clock_rate // 50
        t = np.arange(n * frames) / self.clock_rate
        x = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
        if self.channels == 2:
            x = np.repeat(x, 2)
        step = n * self.channels
        for i in range(frames):
            self.on_audio(x[i * step:(i + 1) * step].tobytes())

    @property
    def played_bytes(self) -> int:
        return sum(len(p) for p in self.played)


# -- the real server ------------------------------------------------------------------------------
class Conn:
    """One accepted WebSocket: what the gateway sent, and the server side to answer with."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.ws = ws
        self.headers = request.headers
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def next(self, timeout: float = T) -> Any:
        async with asyncio.timeout(timeout):
            return await self.inbox.get()

    async def text(self, timeout: float = T) -> dict[str, Any]:
        """The next text frame (binary frames before it are skipped)."""
        while True:
            item = await self.next(timeout)
            if isinstance(item, dict):
                return item

    async def binary(self, count: int, timeout: float = T) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < count:
            item = await self.next(timeout)
            if isinstance(item, bytes):
                out.append(item)
        return out

    async def send(self, obj: Any) -> None:
        await self.ws.send_str(obj if isinstance(obj, str) else json.dumps(obj))

    def abort(self) -> None:
        transport = self.request.transport
        assert transport is not None
        transport.abort()


class Server:
    def __init__(self) -> None:
        self.mode = "ws"  # "ws", or an HTTP status to answer the upgrade with
        self.attempts: list[float] = []
        self.conns: asyncio.Queue[Conn] = asyncio.Queue()
        self.texts: list[dict[str, Any]] = []  # every text frame any gateway sent
        self.posts: list[tuple[bytes, str | None]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def url(self, path: str = "/ws", scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_post("/status", self._status)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        server = self._site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

    def stop_listening(self) -> None:
        """New connections are refused; the open ones stay."""
        assert self._site is not None and self._site._server is not None
        self._site._server.close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def conn(self, timeout: float = T) -> Conn:
        async with asyncio.timeout(timeout):
            return await self.conns.get()

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.attempts.append(time.monotonic())
        if self.mode != "ws":
            return web.Response(status=int(self.mode), text="no")
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=1 << 20)
        await ws.prepare(request)
        conn = Conn(request, ws)
        self.conns.put_nowait(conn)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    obj = json.loads(msg.data)
                    self.texts.append(obj)
                    conn.inbox.put_nowait(obj)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    conn.inbox.put_nowait(bytes(msg.data))
        finally:
            conn.closed.set()
        return ws

    async def _status(self, request: web.Request) -> web.Response:
        self.posts.append((await request.read(), request.headers.get(SIGNATURE_HEADER)))
        return web.Response(text="ok")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    await s.close()
    # Pipecat's jambonz serializer reads message["event"] of every text frame.
    bad = [t for t in s.texts if not isinstance(t.get("event"), str)]
    assert not bad, bad


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def runner(http: aiohttp.ClientSession, url: str, audio: FakeAudio, *,
           settings: StreamsSettings = FAST, name: str = "agent", token: str | None = None,
           **kw: Any) -> StreamForkRunner:
    fork = StreamForkRunner(StreamRequest(url=url, **kw), name, http=http, audio=audio.factory,
                            call=CALL, settings=settings, token=token)
    fork.start()
    return fork


async def ended(fork: StreamForkRunner, timeout: float = T) -> StreamEnd:
    async with asyncio.timeout(timeout):
        return await asyncio.shield(fork.ended)


async def until(cond: Callable[[], bool], timeout: float = T) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 (polls what the fork does on its own)
            await asyncio.sleep(0.005)


async def connected(server: Server, http: aiohttp.ClientSession, audio: FakeAudio,
                    **kw: Any) -> tuple[StreamForkRunner, Conn, dict[str, Any]]:
    fork = runner(http, server.url(), audio, **kw)
    conn = await server.conn()
    start = await conn.text()
    return fork, conn, start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def pcm16(rate: int, ms: int) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (6000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()


# -- the preamble ---------------------------------------------------------------------------------
async def test_subprotocol_and_preamble(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, start = await connected(
        server, http, audio, output_rate=16000, headers={"tenant": "acme"},
        metadata="order-42")
    assert conn.ws.ws_protocol == SUBPROTOCOL
    assert SUBPROTOCOL in conn.headers["Sec-WebSocket-Protocol"]
    assert "Authorization" not in conn.headers
    assert start == {
        "event": "start", "callId": "call-1", "callSid": "call-1", "from": "+254700000001",
        "to": "+254711000002", "direction": "inbound", "workspaceId": "ws-9",
        "sampleRate": 16000, "mixType": "mono", "track": "inbound_track",
        "streamName": "agent", "headers": {"tenant": "acme"}, "metadata": "order-42"}
    end = await fork.stop()
    assert end.reason == "stopped" and end.connected


async def test_preamble_stereo_defaults(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio(channels=2)
    fork, _conn, start = await connected(server, http, audio, track="both_tracks", name="s2")
    assert start["mixType"] == "stereo"
    assert start["track"] == "both_tracks"
    assert start["sampleRate"] == 8000
    assert start["headers"] == {}
    assert start["metadata"] is None
    assert start["streamName"] == "s2"
    await fork.stop()


# -- the caller's audio out -----------------------------------------------------------------------
@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 1), (24000, 1), (16000, 2)])
async def test_caller_frames_binary_exact_20ms(server: Server, http: aiohttp.ClientSession,
                                               rate: int, channels: int) -> None:
    audio = FakeAudio(channels=channels)
    track = "both_tracks" if channels == 2 else "inbound_track"
    fork, conn, _ = await connected(server, http, audio, output_rate=rate, track=track)
    audio.push(10)
    frames = await conn.binary(9)
    size = rate // 50 * 2 * channels
    assert all(len(f) == size for f in frames), {len(f) for f in frames}
    await asyncio.sleep(0.05)
    rest = [conn.inbox.get_nowait() for _ in range(conn.inbox.qsize())]
    assert len(rest) <= 1  # 9 or 10 frames for 10 ticks, never more
    assert all(isinstance(b, bytes) and len(b) == size for b in rest)
    assert 9 <= fork.counters.frames_out <= 10
    # the audio itself survives: the 440 Hz tone is there, not silence
    x = np.frombuffer(b"".join(frames[2:]), dtype="<i2")
    assert np.abs(x.astype(np.int32)).max() > 4000
    await fork.stop()


async def test_no_frames_before_the_socket(http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork = runner(http, f"ws://127.0.0.1:{free_port()}/ws", audio)
    await until(lambda: audio.on_audio is not None)
    audio.push(3)  # nobody to send to: dropped, not queued for later
    assert fork.counters.frames_out == 0
    await fork.stop()


# -- the server's audio in ------------------------------------------------------------------------
async def test_server_binary_16k_played_at_8k(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio, playback_rate=16000)
    chunk = pcm16(16000, 500)
    for i in range(0, len(chunk), 1234):  # odd chunk sizes
        await conn.ws.send_bytes(chunk[i:i + 1234])
    await until(lambda: audio.played_bytes >= 8000 - 320)
    await asyncio.sleep(0.05)
    assert abs(audio.played_bytes - 8000) <= 320  # 500 ms at 8 kHz, +-1 frame
    assert all(len(p) % 2 == 0 for p in audio.played)
    await fork.stop()


async def test_play_audio_raw_then_play_done(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    clip = pcm16(16000, 200)
    await conn.send({"type": "playAudio", "data": {
        "audioContent": base64.b64encode(clip).decode(), "audioContentType": "raw",
        "sampleRate": 16000}})
    await until(lambda: len(audio.cues) == 1)
    assert abs(audio.played_bytes - 3200) <= 4  # 200 ms at 8 kHz
    assert conn.inbox.empty()  # playDone only once played
    audio.fire()
    assert await conn.text() == {"type": "playDone", "event": "playDone",
                                 "data": {"id": 1, "completed": True}}
    # raw without sampleRate: the bidirectional rate (8000 default: as is)
    await conn.send({"type": "playAudio", "data": {
        "audioContent": base64.b64encode(pcm16(8000, 100)).decode()}})
    await until(lambda: len(audio.cues) == 1)
    assert audio.played[-1] == pcm16(8000, 100)
    audio.fire()
    assert (await conn.text())["data"] == {"id": 2, "completed": True}
    await fork.stop()


async def test_play_audio_wav(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    x = np.frombuffer(pcm16(24000, 300), dtype="<i2")
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, x], axis=1), 24000, format="WAV", subtype="PCM_16")
    await conn.send({"type": "playAudio", "data": {
        "audioContent": base64.b64encode(buf.getvalue()).decode(),
        "audioContentType": "wav"}})
    await until(lambda: len(audio.cues) == 1)
    assert abs(audio.played_bytes - 4800) <= 8  # 300 ms at 8 kHz, mono
    audio.fire()
    done = await conn.text()
    assert done["event"] == "playDone" and done["data"]["completed"] is True
    # undecodable audio: an error frame, nothing played, the fork goes on
    await conn.send({"type": "playAudio", "data": {"audioContent": "AAAA",
                                                    "audioContentType": "wav"}})
    err = await conn.text()
    assert err["event"] == "error" and "cannot decode" in err["data"]["message"]
    await conn.send({"type": "playAudio", "data": {"audioContent": "%%%"}})
    err = await conn.text()
    assert "not base64" in err["data"]["message"]
    assert len(audio.played) == 1 and not fork.ended.done()
    await fork.stop()


async def test_queue_full_answers_error(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    audio.accept = False
    await conn.ws.send_bytes(pcm16(8000, 40))
    err = await conn.text()
    assert err["event"] == "error" and "queue full" in err["data"]["message"]
    assert not fork.ended.done()
    await fork.stop()


# -- marks ----------------------------------------------------------------------------------------
async def test_mark_playout_and_cleared_on_kill(server: Server,
                                                http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.ws.send_bytes(pcm16(8000, 100))
    await conn.send({"type": "mark", "data": {"name": "m1"}})
    await until(lambda: len(audio.cues) == 1)
    audio.fire()
    assert await conn.text() == {"type": "mark", "event": "mark",
                                 "data": {"name": "m1", "event": "playout"}}
    await conn.ws.send_bytes(pcm16(8000, 100))
    await conn.send({"type": "mark", "data": {"name": "m2"}})
    await conn.send({"type": "killAudio"})
    assert await conn.text() == {"type": "mark", "event": "mark",
                                 "data": {"name": "m2", "event": "cleared"}}
    assert audio.kills == 1 and not audio.cues
    # after a kill nothing is queued: a disconnect ends at once (no drain)
    await conn.send({"type": "disconnect"})
    end = await ended(fork)
    assert end.reason == "disconnect"


async def test_clear_marks(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.send({"type": "mark", "data": {"name": "a"}})
    await conn.send({"type": "mark", "data": {"name": "b"}})
    await until(lambda: len(audio.cues) == 2)
    await conn.send({"type": "clearMarks"})
    got = [await conn.text(), await conn.text()]
    assert [(g["data"]["name"], g["data"]["event"]) for g in got] == [
        ("a", "cleared"), ("b", "cleared")]
    audio.fire()  # the cues fire later: nothing more is sent for a and b
    await conn.send({"type": "mark", "data": {"name": "after"}})
    await until(lambda: len(audio.cues) == 1)
    audio.fire()
    assert (await conn.text())["data"] == {"name": "after", "event": "playout"}
    await fork.stop()


# -- graceful ends --------------------------------------------------------------------------------
async def test_disconnect_waits_for_queued_audio(server: Server,
                                                 http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.ws.send_bytes(pcm16(8000, 200))
    await conn.send({"type": "disconnect"})
    await until(lambda: len(audio.cues) == 1)  # the drain waits for what is queued
    await asyncio.sleep(0.05)
    assert not fork.ended.done()
    audio.fire()
    end = await ended(fork)
    assert end.reason == "disconnect" and end.connected and end.handover is None
    async with asyncio.timeout(T):
        await conn.closed.wait()
    assert audio.closed


async def test_handover_with_data(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio, purpose="ai_agent")
    await conn.ws.send_bytes(pcm16(8000, 100))
    await conn.send({"type": "handover", "data": {"reason": "transfer", "queue": "sales"}})
    await until(lambda: len(audio.cues) == 1)
    audio.fire()
    end = await ended(fork)
    assert end.reason == "handover"
    assert end.handover == {"reason": "transfer", "queue": "sales"}


@pytest.mark.parametrize("code", [1000, 1001])
async def test_server_normal_close_is_closed(server: Server, http: aiohttp.ClientSession,
                                            code: int) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.ws.close(code=code)
    end = await ended(fork)
    assert end.reason == "closed" and end.close_code == code and end.connected
    assert len(server.attempts) == 1


async def test_close_without_status_is_closed(http: aiohttp.ClientSession) -> None:
    """A close frame with no code (Node's `ws.close()`): a normal close, not a drop that
    reconnects to a server that just ended the call."""
    attempts: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(time.monotonic())
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Protocol: " + SUBPROTOCOL.encode()
                     + b"\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        writer.write(bytes([0x88, 0x00]))  # FIN + close, no payload
        await writer.drain()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.3):
                await reader.read(-1)
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        fork = runner(http, f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/ws",
                      FakeAudio())
        end = await ended(fork)
        assert end.reason == "closed" and end.close_code == 1005 and end.connected
        await asyncio.sleep(0.4)
        assert len(attempts) == 1
    finally:
        srv.close()


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [4000, 1011])
async def test_error_close_code_is_refused(server: Server, http: aiohttp.ClientSession,
                                           code: int) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.ws.close(code=code, message=b"busy")
    end = await ended(fork)
    assert end.reason == "refused" and end.close_code == code
    assert end.unavailable and end.connected
    await asyncio.sleep(0.3)
    assert len(server.attempts) == 1  # not retried


async def test_error_frame_is_refused(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.send({"type": "error", "data": {"message": "no agents free"}})
    end = await ended(fork)
    assert end.reason == "refused" and "no agents free" in end.message
    await asyncio.sleep(0.3)
    assert len(server.attempts) == 1


@pytest.mark.parametrize("frame", ['{"type": "sendDigits", "digits": "1"}', "{nope",
                                   '{"type": "mark"}'])
async def test_bad_frame_answered_and_fork_goes_on(server: Server,
                                                   http: aiohttp.ClientSession,
                                                   frame: str) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.send(frame)
    err = await conn.text()
    assert err["type"] == "error" and err["event"] == "error"
    assert isinstance(err["data"]["message"], str) and err["data"]["message"]
    await conn.send({"type": "mark", "data": {"name": "still-here"}})
    await until(lambda: len(audio.cues) == 1)
    audio.fire()
    assert (await conn.text())["data"] == {"name": "still-here", "event": "playout"}
    assert fork.counters.bad_frames == 1 and not fork.ended.done()
    await fork.stop()


async def test_binary_above_max_message_is_refused(server: Server,
                                                   http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    settings = StreamsSettings(connect_timeout_s=0.5, retries=2, retry_window_s=1.5,
                               max_message_bytes=1024)
    fork, conn, _ = await connected(server, http, audio, settings=settings)
    await conn.ws.send_bytes(bytes(1000))  # under the limit: played
    await conn.ws.send_bytes(bytes(4096))
    end = await ended(fork)
    assert end.reason == "refused" and end.close_code == 1009  # message too big
    assert "1024" in end.message
    assert audio.played_bytes == 1000
    await asyncio.sleep(0.3)
    assert len(server.attempts) == 1


async def test_403_refused_after_one_attempt(server: Server,
                                             http: aiohttp.ClientSession) -> None:
    server.mode = "403"
    fork = runner(http, server.url(), FakeAudio())
    end = await ended(fork)
    assert end.reason == "refused" and "403" in end.message and not end.connected
    assert end.unavailable
    await asyncio.sleep(0.4)
    assert len(server.attempts) == 1


# -- unreachable ----------------------------------------------------------------------------------
async def test_503_retried_within_window_then_unreachable(
        server: Server, http: aiohttp.ClientSession) -> None:
    server.mode = "503"
    fork = runner(http, server.url(), FakeAudio())
    end = await ended(fork, timeout=5)
    assert end.reason == "unreachable" and "503" in end.message and not end.connected
    await asyncio.sleep(0.3)
    assert 2 <= len(server.attempts) <= 1 + FAST.retries
    assert server.attempts[-1] - server.attempts[0] <= FAST.retry_window_s


async def test_closed_port_unreachable(http: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    fork = runner(http, f"ws://127.0.0.1:{free_port()}/ws", FakeAudio())
    end = await ended(fork, timeout=5)
    assert end.reason == "unreachable" and not end.connected and end.unavailable
    assert time.monotonic() - t0 <= FAST.retry_window_s + 0.3


async def test_upgrade_never_answered_unreachable(http: aiohttp.ClientSession) -> None:
    attempts: list[float] = []
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(time.monotonic())
        writers.append(writer)
        with contextlib.suppress(Exception):
            await reader.read(-1)  # reads the upgrade, never answers it

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        fork = runner(http, f"ws://127.0.0.1:{port}/ws", FakeAudio())
        end = await ended(fork, timeout=6)
        took = time.monotonic() - t0
        assert end.reason == "unreachable" and "no answer" in end.message
        assert took <= FAST.connect_timeout_s + FAST.retry_window_s + 0.5, took
        assert took >= FAST.connect_timeout_s
        assert 2 <= len(attempts) <= 1 + FAST.retries
        first_failure = attempts[0] + FAST.connect_timeout_s
        assert attempts[-1] - first_failure <= FAST.retry_window_s
    finally:
        for w in writers:
            w.close()
        srv.close()


# -- drops ----------------------------------------------------------------------------------------
async def test_drop_reconnects_then_dropped(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, start = await connected(server, http, audio)
    conn.abort()
    conn2 = await server.conn()
    again = await conn2.text()
    assert again == start  # the preamble again
    assert fork.counters.connects == 2 and not fork.ended.done()
    # the stream goes on over the new socket
    audio.push(3)
    assert len(await conn2.binary(2)) == 2
    server.stop_listening()
    conn2.abort()
    end = await ended(fork, timeout=5)
    assert end.reason == "dropped" and end.connected and not end.unavailable


async def test_a_later_drop_is_retried_again(server: Server,
                                            http: aiohttp.ClientSession) -> None:
    """A drop long after the last one starts a new retry window: a long call is not cut by
    its second drop because its first was minutes ago."""
    settings = StreamsSettings(connect_timeout_s=0.5, retries=1, retry_window_s=0.6)
    audio = FakeAudio()
    fork, conn, start = await connected(server, http, audio, settings=settings)
    conn.abort()
    conn2 = await server.conn()
    assert await conn2.text() == start
    await asyncio.sleep(settings.retry_window_s + 0.2)  # up for longer than the window
    conn2.abort()
    conn3 = await server.conn()
    assert await conn3.text() == start
    assert fork.counters.connects == 3 and not fork.ended.done()
    await fork.stop()


async def test_flapping_server_is_not_retried_forever(server: Server,
                                                      http: aiohttp.ClientSession) -> None:
    """A server that accepts and drops at once gets at most `retries` reconnects per window."""
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    conn.abort()
    for _ in range(FAST.retries):
        conn = await server.conn()
        await conn.text()
        conn.abort()
    end = await ended(fork, timeout=5)
    assert end.reason == "dropped" and end.connected
    assert fork.counters.connects == 1 + FAST.retries


# -- stop, DTMF -----------------------------------------------------------------------------------
async def test_stop_closes_the_socket(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.ws.send_bytes(pcm16(8000, 500))
    await until(lambda: audio.played_bytes > 0)
    end = await fork.stop()
    assert end.reason == "stopped" and end.connected
    assert await fork.stop() is end  # idempotent
    async with asyncio.timeout(T):
        await conn.closed.wait()
    assert audio.closed and not audio.cues


async def test_stop_while_connecting(http: aiohttp.ClientSession) -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception):
            await reader.read(-1)

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        audio = FakeAudio()
        settings = StreamsSettings(connect_timeout_s=5, retries=2, retry_window_s=5)
        fork = runner(http, f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/ws", audio,
                      settings=settings)
        await until(lambda: bool(writers))
        t0 = time.monotonic()
        end = await fork.stop()
        assert time.monotonic() - t0 < 0.5
        assert end.reason == "stopped" and not end.connected and not end.unavailable
        assert audio.closed
    finally:
        for w in writers:
            w.close()
        srv.close()


async def test_stop_cuts_a_drain(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.ws.send_bytes(pcm16(8000, 2000))
    await conn.send({"type": "disconnect"})
    await until(lambda: len(audio.cues) == 1)
    end = await fork.stop()  # the API's stop while what was queued plays out
    assert end.reason == "stopped"


async def test_drain_is_bounded(server: Server, http: aiohttp.ClientSession) -> None:
    """A cue that never fires (a stuck port): the graceful end waits at most the queued
    audio's length + DRAIN_SLACK_S."""
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    await conn.ws.send_bytes(pcm16(8000, 100))
    await until(lambda: audio.played_bytes > 0)
    t0 = time.monotonic()
    await conn.send({"type": "disconnect"})
    end = await ended(fork)
    assert end.reason == "disconnect"
    assert 0.1 + DRAIN_SLACK_S - 0.1 <= time.monotonic() - t0 <= 0.1 + DRAIN_SLACK_S + 0.5


async def test_dtmf_frame(server: Server, http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    fork.on_dtmf("5", 160)
    fork.on_dtmf("#", 0)
    assert await conn.text() == {"event": "dtmf", "dtmf": "5", "duration": 160}
    assert await conn.text() == {"event": "dtmf", "dtmf": "#", "duration": 0}
    await fork.stop()


async def test_backlog_drops_audio_never_text(server: Server,
                                             http: aiohttp.ClientSession) -> None:
    """A socket that falls behind loses its oldest audio frames, never a DTMF (or mark,
    playDone) text frame queued among them."""
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    fork.on_dtmf("1", 100)
    audio.push(MAX_BACKLOG_FRAMES + 50)  # all in one go: the sender cannot run meanwhile
    fork.on_dtmf("2", 100)
    assert await conn.text() == {"event": "dtmf", "dtmf": "1", "duration": 100}
    assert await conn.text() == {"event": "dtmf", "dtmf": "2", "duration": 100}
    assert fork.counters.frames_dropped == 50
    await fork.stop()


def test_repr_never_shows_the_token() -> None:
    settings = AiAgentsSettings(url="wss://agents.example/rt", token=TOKEN)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    assert TOKEN not in repr(FAST)


async def test_runner_repr_never_shows_the_token(server: Server,
                                                 http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio, token=TOKEN, purpose="ai_agent")
    assert conn.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in repr(fork) and TOKEN not in str(fork)
    await fork.stop()


# -- CallStreams ----------------------------------------------------------------------------------
class Streams:
    """CallStreams with a fake audio port per fork and a real signed poster."""

    def __init__(self, http: aiohttp.ClientSession, *, allow_http: bool = True,
                 allow_private: bool = True, agents: AiAgentsSettings | None = None) -> None:
        self.audios: list[FakeAudio] = []
        self.changes: list[tuple[str, str]] = []
        app = VoiceAppClient(http, FIELDS, SECRET, "json", allow_http=True, allow_private=True)
        self.streams = CallStreams(
            call=None, info=CALL, app=app, post=app.post_json, http=http, streams=FAST,
            agents=agents or AiAgentsSettings(),
            callbacks=CallbacksSettings(allow_http=allow_http, allow_private=allow_private),
            audio=self._audio, on_change=lambda e, d: self.changes.append((e, d)))

    def _audio(self, request: StreamRequest, on_audio: Callable[[bytes], None]) -> FakeAudio:
        a = FakeAudio(channels=2 if request.track == "both_tracks" else 1)
        self.audios.append(a)
        return a.factory(on_audio)


async def test_call_streams_names_replace_stop(server: Server,
                                               http: aiohttp.ClientSession) -> None:
    s = Streams(http)
    cs = s.streams
    f1 = await cs.open(StreamRequest(url=server.url()))
    f2 = await cs.open(StreamRequest(url=server.url()))
    assert (f1.name, f2.name) == ("stream-1", "stream-2")
    c1, c2 = await server.conn(), await server.conn()
    assert {(await c1.text())["streamName"], (await c2.text())["streamName"]} == {
        "stream-1", "stream-2"}
    agent = await cs.open(StreamRequest(url=server.url(), name="agent"))
    ca = await server.conn()
    await ca.text()
    # the same name again: the running fork is stopped and replaced
    agent2 = await cs.open(StreamRequest(url=server.url(), name="agent"))
    assert agent.ended.done() and agent.ended.result().reason == "stopped"
    async with asyncio.timeout(T):
        await ca.closed.wait()
    await (await server.conn()).text()
    assert sorted(cs.running) == ["agent", "stream-1", "stream-2"]
    assert await cs.stop("nobody") == 0
    assert await cs.stop("stream-1") == 1
    assert f1.ended.result().reason == "stopped"
    assert sorted(cs.running) == ["agent", "stream-2"]
    assert await cs.stop(None) == 2
    assert cs.running == []
    assert agent2.ended.result().reason == "stopped" and f2.ended.result().reason == "stopped"
    assert ("open", "stream") in s.changes and ("end", "stopped") in s.changes
    # DTMF reaches every running fork (the call's dtmf listener)
    f3 = await cs.open(StreamRequest(url=server.url()))
    assert f3.name == "stream-3"
    c3 = await server.conn()
    await c3.text()
    cs._dtmf("7", 120)
    assert await c3.text() == {"event": "dtmf", "dtmf": "7", "duration": 120}
    await cs.stop()


async def test_call_streams_close_all(server: Server, http: aiohttp.ClientSession) -> None:
    s = Streams(http)
    cs = s.streams
    forks = [await cs.open(StreamRequest(url=server.url())) for _ in range(2)]
    conns = [await server.conn() for _ in range(2)]
    for c in conns:
        await c.text()
    cs.close_all()
    for f in forks:
        assert f.ended.done() and f.ended.result().reason == "stopped"
    assert cs.running == []
    for c in conns:
        async with asyncio.timeout(T):
            await c.closed.wait()
    assert all(a.closed for a in s.audios)
    with pytest.raises(CallEnded):
        await cs.open(StreamRequest(url=server.url()))


async def test_call_streams_guard(server: Server, http: aiohttp.ClientSession) -> None:
    no_private = Streams(http, allow_http=True, allow_private=False).streams
    with pytest.raises(MediaError) as e:
        await no_private.open(StreamRequest(url=server.url()))
    assert e.value.code == "url_forbidden"
    no_http = Streams(http, allow_http=False, allow_private=True).streams
    with pytest.raises(MediaError) as e:
        await no_http.open(StreamRequest(url=server.url()))
    assert e.value.code == "url_forbidden"
    with pytest.raises(MediaError) as e:
        await no_http.open(StreamRequest(url=server.url(scheme="http")))
    assert e.value.code == "url_forbidden"
    assert no_private.running == [] and no_http.running == []
    assert server.attempts == []


async def test_call_streams_ai_agent(server: Server, http: aiohttp.ClientSession) -> None:
    agents = AiAgentsSettings(url=server.url(), sample_rate=16000, token=TOKEN)
    s = Streams(http, allow_http=False, allow_private=False, agents=agents)
    cs = s.streams
    assert cs.agent is not None and cs.agent.url == server.url()
    fork = await cs.open(StreamRequest(
        url=server.url(), connect=True, output_rate=16000, playback_rate=16000,
        metadata={"agentId": "support-ke", "revision": 3, "variables": {"tier": "gold"}},
        purpose="ai_agent"))
    conn = await server.conn()
    start = await conn.text()
    assert conn.headers["Authorization"] == f"Bearer {TOKEN}"
    assert start["sampleRate"] == 16000
    assert start["metadata"] == {
        "agentId": "support-ke", "revision": 3, "variables": {"tier": "gold"},
        "call": {"callId": "call-1", "from": "+254700000001", "to": "+254711000002",
                 "direction": "inbound", **FIELDS},
        "workspaceId": "ws-9"}
    assert TOKEN not in repr(fork) and TOKEN not in repr(cs.agent)
    assert ("open", "ai_agent") in s.changes
    # a plain stream on the same call gets no token
    plain = Streams(http, agents=agents).streams
    await plain.open(StreamRequest(url=server.url()))
    assert "Authorization" not in (await server.conn()).headers
    await plain.stop()
    await cs.stop()


# -- status callbacks -----------------------------------------------------------------------------
async def _posts(server: Server, n: int) -> list[dict[str, Any]]:
    await until(lambda: len(server.posts) >= n)
    await asyncio.sleep(0.2)  # and no more
    out = []
    for body, header in server.posts:
        assert header is not None
        verify(body, header, SECRET)
        out.append(json.loads(body))
    return out


async def test_status_started_and_error_only(server: Server,
                                             http: aiohttp.ClientSession) -> None:
    cs = Streams(http).streams
    fork = await cs.open(StreamRequest(
        url=server.url(), name="agent", status_callback=server.url("/status", "http"),
        status_events=frozenset({"stream-started", "stream-error"})))
    conn = await server.conn()
    await conn.text()
    await conn.ws.close(code=4000, message=b"busy")
    assert (await ended(fork)).reason == "refused"
    posts = await _posts(server, 2)
    assert [p["event"] for p in posts] == ["stream-started", "stream-error"]
    for p in posts:
        assert p["callId"] == "call-1" and p["streamName"] == "agent"
        assert p["streamUrl"] == server.url()
        assert p["timestamp"].endswith("Z") and "T" in p["timestamp"]
        assert p["callStatus"] == "in-progress" and p["from"] == "+254700000001"
    assert "error" not in posts[0]
    assert "4000" in posts[1]["error"]


async def test_status_stopped_only(server: Server, http: aiohttp.ClientSession) -> None:
    cs = Streams(http).streams
    fork = await cs.open(StreamRequest(
        url=server.url(), status_callback=server.url("/status", "http"),
        status_events=frozenset({"stream-stopped"})))
    conn = await server.conn()
    await conn.text()
    await conn.ws.close(code=1000)
    assert (await ended(fork)).reason == "closed"
    posts = await _posts(server, 1)
    assert [p["event"] for p in posts] == ["stream-stopped"]
    assert "error" not in posts[0]


async def test_status_stopped_on_stop(server: Server, http: aiohttp.ClientSession) -> None:
    cs = Streams(http).streams
    await cs.open(StreamRequest(
        url=server.url(), status_callback=server.url("/status", "http"),
        status_events=frozenset({"stream-stopped", "stream-error"})))
    await (await server.conn()).text()
    assert await cs.stop() == 1
    posts = await _posts(server, 1)
    assert [p["event"] for p in posts] == ["stream-stopped"]


async def test_status_error_when_unreachable(server: Server,
                                             http: aiohttp.ClientSession) -> None:
    server.mode = "403"
    cs = Streams(http).streams
    fork = await cs.open(StreamRequest(
        url=server.url(), status_callback=server.url("/status", "http"),
        status_events=frozenset({"stream-started", "stream-stopped", "stream-error"})))
    assert (await ended(fork)).reason == "refused"
    posts = await _posts(server, 1)
    assert [p["event"] for p in posts] == ["stream-error"]
    assert "403" in posts[0]["error"]


# -- what a hostile document or server cannot do ---------------------------------------------------
@pytest.mark.parametrize("rates", [{"output_rate": 10}, {"output_rate": 49},
                                   {"playback_rate": 1}, {"playback_rate": 400000}])
async def test_rates_outside_4000_384000_are_refused_at_open(
        server: Server, http: aiohttp.ClientSession, rates: dict[str, Any]) -> None:
    # A 10 Hz output rate has no whole sample in 20 ms: it once looped the worker forever.
    s = Streams(http)
    with pytest.raises(MediaError) as e:
        await s.streams.open(StreamRequest(url=server.url(), **rates))
    assert e.value.code == "stream_rate_unsupported"
    assert not server.attempts and not s.audios


async def test_play_audio_headers_checked_before_decoding(server: Server,
                                                          http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)

    def wav(rate: int, seconds: float, fmt: str = "WAV") -> str:
        buf = io.BytesIO()
        sf.write(buf, np.zeros(int(rate * seconds), dtype="<i2"), rate, format=fmt)
        return base64.b64encode(buf.getvalue()).decode()

    for content, why in ((wav(1000, 0.5), "1000 Hz"), (wav(8000, 130.0), "at most"),
                         (wav(8000, 0.2, "FLAC"), "WAV only")):
        await conn.send({"type": "playAudio", "data": {"audioContent": content,
                                                        "audioContentType": "wav"}})
        err = await conn.text()
        assert err["event"] == "error" and why in err["data"]["message"], err
    raw = base64.b64encode(bytes(2 * 8000 * 130)).decode()  # 130 s at 8 kHz: over 120
    await conn.send({"type": "playAudio", "data": {"audioContent": raw}})
    assert "at most" in (await conn.text())["data"]["message"]
    assert not audio.played and not fork.ended.done()
    await fork.stop()


async def test_a_flood_of_marks_and_bad_frames_stays_bounded(server: Server,
                                                             http: aiohttp.ClientSession) -> None:
    audio = FakeAudio()
    fork, conn, _ = await connected(server, http, audio)
    for i in range(1100):
        await conn.ws.send_str(json.dumps({"type": "mark", "data": {"name": f"m{i}"}}))
    for _ in range(200):
        await conn.ws.send_str("{nope")
    await conn.send({"type": "clearMarks"})
    await until(lambda: fork.counters.messages_in == 1301)
    # 1000 marks pending at most; error frames back: a burst of 10 (more only one a second)
    cleared = [t for t in server.texts if t.get("type") == "mark"]
    errors = [t for t in server.texts if t.get("type") == "error"]
    await until(lambda: len([t for t in server.texts if t.get("type") == "mark"]) == 1000)
    assert len(audio.cues) == 1000 and len(cleared) <= 1000
    assert 1 <= len(errors) <= 11, len(errors)
    assert not fork.ended.done()
    await fork.stop()


async def test_redirect_to_a_metadata_address_is_refused(http: aiohttp.ClientSession) -> None:
    from gateway.urlguard import make_session

    app = web.Application()

    async def moved(_r: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    app.router.add_get("/ws", moved)
    run = web.AppRunner(app)
    await run.setup()
    site = web.TCPSite(run, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    guarded = make_session(allow_private=True)
    try:
        fork = runner(guarded, f"ws://127.0.0.1:{port}/ws", FakeAudio())
        end = await ended(fork)
        assert end.reason == "refused" and "metadata" in end.message, end
    finally:
        await guarded.close()
        await run.cleanup()
