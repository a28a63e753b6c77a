"""One `stream` fork's WebSocket side: connect (and retry), the preamble, the caller's frames
out, the server's audio and commands in (docs/streams.md has the protocol).

The audio side is an `AudioPort` (media/fork.py's AudioFork; a fake in unit tests): it hands
one frame per 20 ms tick to `_on_audio` and plays what `play()` is given. Here, on the loop:

* out: each frame is resampled to the request's `output_rate`, cut into exact 20 ms frames,
  and put on one outgoing queue that a single sender task writes to the socket (text frames
  too, so nothing is written concurrently). A socket that falls behind loses its oldest frames
  (`MAX_BACKLOG_FRAMES`), never the call's latency.
* in: one receiver loop handles every frame in arrival order, so a `killAudio` is never
  overtaken by audio sent before it, and audio sent after it is queued after the flush.
  Binary audio is resampled with a streaming resampler (`playback_rate` -> the bridge's);
  `playAudio` clips in one piece.
* connect failures and drops are retried (`[streams] retries` within `retry_window_s` of the
  first failure); an HTTP 4xx on the upgrade, an error close code or an `error` frame is a
  refusal and is not retried.
* a graceful end (`disconnect`, `handover`, a normal close) lets what the server already
  queued play out first (the agent's "let me transfer you"), bounded by its length; a stop
  (the API, the call's end) cuts it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import numpy as np
import soundfile as sf

from config.settings import StreamsSettings
from dsl.context import MediaError, StreamEnd, StreamEndReason, StreamRequest
from gateway.streams import messages as m
from gateway.urlguard import UrlForbidden, check_url
from media.resample import Resampler, resample_clip

log = logging.getLogger(__name__)

SUBPROTOCOL = "audio.drachtio.org"
FRAME_MS = 20
MAX_BACKLOG_FRAMES = 250  # 5 s of frames waiting for a slow socket; older ones are dropped
# 1005: a close frame without a status code (Node's `ws.close()`), a normal close too.
NORMAL_CLOSE = (1000, 1001, 1005)
NO_STATUS = 1005
DRAIN_SLACK_S = 1.0
# A hostile peer's floods stay bounded: pending marks + clips, error frames sent back, and
# how many buffered messages run before the receiver yields to the loop.
MAX_PENDING_CUES = 1000
ERROR_BURST = 10
YIELD_EVERY = 64
AGENT_MESSAGES = {
    "unreachable": "the agent runtime could not be reached",
    "refused": "the agent runtime refused the call",
    "dropped": "the connection to the agent runtime was lost",
}  # a graceful end waits for queued playback at most its length + this


class AudioPort(Protocol):
    """What a fork needs of the call's audio (media/fork.py AudioFork)."""

    clock_rate: int
    channels: int

    def play(self, pcm: bytes) -> bool: ...

    def cue(self, fn: Callable[[bool], None]) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...


# Makes the audio side once the fork runs: (the frame sink) -> an AudioPort, started.
AudioFactory = Callable[[Callable[[bytes], None]], AudioPort]
# Posts a stream status event: (event, error or None); never raises.
StatusSink = Callable[[str, str | None], Awaitable[None]]


@dataclass(frozen=True)
class CallInfo:
    """The call's attributes for the preamble."""

    call_id: str
    from_: str
    to: str
    direction: str
    workspace_id: str
    fields: Mapping[str, str] = field(default_factory=dict)  # the voice callback fields


@dataclass
class ForkCounters:
    frames_out: int = 0
    frames_dropped: int = 0  # out frames dropped for a slow socket
    audio_in_bytes: int = 0
    messages_in: int = 0
    bad_frames: int = 0
    connects: int = 0


class _Refused(Exception):
    """The far end refused the stream (not retried)."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code


class _Ended(Exception):
    """The session is over for `reason` (after a connection was up)."""

    def __init__(self, reason: StreamEndReason, message: str = "", close_code: int | None = None,
                 handover: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason: StreamEndReason = reason
        self.message = message
        self.close_code = close_code
        self.handover = handover


def ws_check_url(url: str) -> str:
    """The http(s) form of a ws(s) URL, for the URL guard."""
    if url.startswith("wss://"):
        return "https://" + url[6:]
    if url.startswith("ws://"):
        return "http://" + url[5:]
    raise UrlForbidden(f"{url!r}: expected ws:// or wss://")


async def guard_ws_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """MediaError url_forbidden unless the guard lets `url` through."""
    try:
        await check_url(ws_check_url(url), allow_http=allow_http, allow_private=allow_private)
    except UrlForbidden as e:  # an unresolvable host (HostUnresolvable) too
        raise MediaError("url_forbidden", f"stream {e.reason}") from None


class StreamForkRunner:
    """A running fork (dsl `StreamFork`): `start()`, then `ended` resolves once."""

    def __init__(
        self,
        request: StreamRequest,
        name: str,
        *,
        http: aiohttp.ClientSession,
        audio: AudioFactory,
        call: CallInfo,
        settings: StreamsSettings,
        status: StatusSink | None = None,
        token: str | None = None,
        on_end: Callable[[StreamForkRunner], None] | None = None,
    ) -> None:
        self.request = request
        self.name = name
        self._http = http
        self._audio_factory = audio
        self._call = call
        self._settings = settings
        self._status = status
        self._token = token
        self._on_end = on_end
        self.ended: asyncio.Future[StreamEnd] = asyncio.get_running_loop().create_future()
        self.counters = ForkCounters()
        self._audio: AudioPort | None = None
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._out: deque[str | bytes] = deque()
        self._out_audio = 0  # of the items in _out, audio frames (only these are dropped)
        self._out_ready = asyncio.Event()
        self._connected_once = False
        self._stopping = False
        self._out_rs: Resampler | None = None
        self._out_buf = bytearray()
        self._out_frame = 0
        self._in_rs: Resampler | None = None
        self._marks: dict[int, str] = {}  # pending marks by token
        self._mark_seq = 0
        self._clips = 0
        self._queued_s = 0.0  # seconds of playback queued since the last kill (drain bound)
        self._status_tasks: set[asyncio.Task[None]] = set()
        self._pending_cues = 0  # marks and clips whose cue has not been answered
        self._err_budget = float(ERROR_BURST)
        self._err_at = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(
            self._run(), name=f"stream {self._call.call_id} {self.name}")

    async def stop(self) -> StreamEnd:
        """Close the fork now (idempotent): what is queued does not play."""
        task = self._task
        self.stop_now("stopped by the gateway")
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return self.ended.result()

    def stop_now(self, why: str = "the call ended") -> None:
        """`stop` without waiting for the run task to unwind (the call's end)."""
        if self.ended.done():
            return
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._finish(StreamEnd("stopped", why, connected=self._connected_once))

    def on_dtmf(self, digit: str, duration_ms: int) -> None:
        if self._ws is not None:
            self._send_text(m.dtmf(digit, duration_ms))

    # -- the run --------------------------------------------------------------------------
    async def _run(self) -> None:
        end: StreamEnd
        try:
            self._audio = self._audio_factory(self._on_audio)
            end = await self._connect_loop()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("call %s: stream %s failed", self._call.call_id, self.name)
            end = StreamEnd("dropped", f"{type(e).__name__}: {e}", connected=self._connected_once)
        self._finish(end)

    def _finish(self, end: StreamEnd) -> None:
        if self.ended.done():
            return
        audio, self._audio = self._audio, None
        if audio is not None:
            audio.close()
        self._out.clear()
        self._out_audio = 0
        if self._ws is not None and not self._ws.closed:
            ws = self._ws
            self._spawn(self._close_ws(ws))
        self._ws = None
        # Pending marks were not played: say so if a socket is still there to hear it (it
        # is not: the socket is closing), so just forget them.
        self._marks.clear()
        if self.request.purpose == "ai_agent" and end.message:
            # The runtime's address and errors are the operator's: the log has them, the
            # voice app (AgentError) gets the reason only.
            log.info("call %s: agent stream %s: %s", self._call.call_id, end.reason, end.message)
            end = dataclasses.replace(end, message=AGENT_MESSAGES.get(end.reason, end.reason))
        self.ended.set_result(end)
        log.info("call %s: stream %s ended: %s%s", self._call.call_id, self.name, end.reason,
                 f" ({end.message})" if end.message else "")
        if end.reason in ("refused", "unreachable", "dropped"):
            self._post_status("stream-error", end.message or end.reason)
        elif self._connected_once:
            self._post_status("stream-stopped", None)
        if self._on_end is not None:
            self._on_end(self)

    async def _connect_loop(self) -> StreamEnd:
        s = self._settings
        first_failure: float | None = None
        retries_left = s.retries
        last_error = ""
        while True:
            timeout = s.connect_timeout_s
            if first_failure is not None:
                remaining = s.retry_window_s - (time.monotonic() - first_failure)
                timeout = min(timeout, max(0.2, remaining))
            try:
                ws = await self._connect(timeout)
            except _Refused as e:
                return StreamEnd("refused", e.message, e.close_code,
                                 connected=self._connected_once)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                last_error = _describe(e, self.request.url)
                log.info("call %s: stream %s: connect failed: %s", self._call.call_id,
                         self.name, last_error)
            else:
                up_at = time.monotonic()
                try:
                    await self._session(ws)
                except _Refused as e:
                    return StreamEnd("refused", e.message, e.close_code, connected=True)
                except _Ended as e:
                    if e.reason != "dropped":
                        return StreamEnd(e.reason, e.message, e.close_code, e.handover,
                                         connected=True)
                    last_error = e.message
                    log.info("call %s: stream %s dropped: %s", self._call.call_id, self.name,
                             e.message)
                    if time.monotonic() - up_at >= s.retry_window_s:
                        # Up for longer than a window: this drop starts a new one (a long
                        # call's second drop is retried too); a flapping server is not.
                        first_failure = None
                        retries_left = s.retries
                finally:
                    self._ws = None
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
            if retries_left <= 0 or now - first_failure >= s.retry_window_s:
                reason: StreamEndReason = "dropped" if self._connected_once else "unreachable"
                return StreamEnd(reason, last_error, connected=self._connected_once)
            retries_left -= 1
            # Spread the tries over the window: 0.25 s, then 1 s.
            pause = 0.25 if retries_left >= s.retries - 1 else 1.0
            pause = min(pause, max(0.0, s.retry_window_s - (now - first_failure) - 0.2))
            await asyncio.sleep(pause)

    async def _connect(self, timeout: float) -> aiohttp.ClientWebSocketResponse:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            async with asyncio.timeout(timeout):
                ws = await self._http.ws_connect(
                    self.request.url,
                    protocols=(SUBPROTOCOL,),
                    heartbeat=self._settings.ping_interval_s,
                    headers=headers,
                    max_msg_size=self._settings.max_message_bytes,
                    autoping=True,
                )
        except aiohttp.WSServerHandshakeError as e:
            if 400 <= e.status < 500:
                raise _Refused(f"the server refused the upgrade: HTTP {e.status}") from None
            raise
        except UrlForbidden as e:  # the guarded session's literal-IP hook
            raise _Refused(e.reason) from None
        if ws.protocol != SUBPROTOCOL:
            log.info("call %s: stream %s: server chose subprotocol %r (asked %s)",
                     self._call.call_id, self.name, ws.protocol, SUBPROTOCOL)
        return ws

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """One connection's life; raises _Ended with why it ended."""
        self._ws = ws
        self.counters.connects += 1
        first = not self._connected_once
        self._connected_once = True
        self._out.clear()
        self._out_audio = 0
        self._out_buf.clear()
        self._send_text(m.dumps(self._preamble()))
        if first:
            self._post_status("stream-started", None)
        sender = asyncio.create_task(self._sender(ws))
        try:
            await self._receive(ws)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            if not ws.closed:
                self._spawn(self._close_ws(ws))  # not awaited: a cancelled stop stays quick

    def _preamble(self) -> dict[str, Any]:
        r, c = self.request, self._call
        metadata: Any = r.metadata
        if r.purpose == "ai_agent":
            metadata = {**(dict(r.metadata) if isinstance(r.metadata, Mapping) else {}),
                        "call": {"callId": c.call_id, "from": c.from_, "to": c.to,
                                 "direction": c.direction, **dict(c.fields)},
                        "workspaceId": c.workspace_id}
        return {
            "event": "start",
            "callId": c.call_id,
            "callSid": c.call_id,
            "from": c.from_,
            "to": c.to,
            "direction": c.direction,
            "workspaceId": c.workspace_id,
            "sampleRate": r.output_rate,
            "mixType": "stereo" if r.track == "both_tracks" else "mono",
            "track": r.track,
            "streamName": self.name,
            "headers": dict(r.headers) if r.headers else {},
            "metadata": metadata,
        }

    # -- out ------------------------------------------------------------------------------
    def _on_audio(self, pcm: bytes) -> None:
        """A 20 ms frame of the call (asyncio thread): to the server, at output_rate."""
        if self._ws is None:
            return
        audio = self._audio
        if audio is None:
            return
        if self._out_rs is None:
            self._out_rs = Resampler(audio.clock_rate, self.request.output_rate, audio.channels)
            self._out_frame = self.request.output_rate * FRAME_MS // 1000 * 2 * audio.channels
        rs = self._out_rs
        if rs.identity:
            self._push(pcm)
            return
        out = rs.process(pcm)
        buf = self._out_buf
        if not buf and len(out) < self._out_frame and self.counters.frames_out == 0:
            # The filter holds a few samples back: pad the first frame once, so every later
            # tick yields a whole frame at once instead of one tick late.
            buf += bytes(self._out_frame - len(out))
        buf += out
        n = self._out_frame
        if n <= 0:  # a rate with no whole sample in 20 ms (refused at open; never loop on it)
            return
        while len(buf) >= n:
            self._push(bytes(buf[:n]))
            del buf[:n]

    def _push(self, frame: bytes) -> None:
        out = self._out
        if self._out_audio >= MAX_BACKLOG_FRAMES:
            # The oldest audio frame goes; text frames (DTMF, marks, playDone) are kept.
            for i, item in enumerate(out):
                if isinstance(item, bytes):
                    del out[i]
                    break
            self._out_audio -= 1
            self.counters.frames_dropped += 1
        out.append(frame)
        self._out_audio += 1
        self.counters.frames_out += 1
        self._out_ready.set()

    def _send_text(self, text: str) -> None:
        self._out.append(text)
        self._out_ready.set()

    async def _sender(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        out, ready = self._out, self._out_ready
        while True:
            while out:
                item = out.popleft()
                if isinstance(item, bytes):
                    self._out_audio -= 1
                    await ws.send_bytes(item)
                else:
                    await ws.send_str(item)
            ready.clear()
            await ready.wait()

    # -- in -------------------------------------------------------------------------------
    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        count = 0
        while True:
            count += 1
            if count % YIELD_EVERY == 0:
                # A buffered burst would otherwise run without a break: let the call's other
                # work (and the worker's other calls) in.
                await asyncio.sleep(0)
            msg = await ws.receive()
            t = msg.type
            if t == aiohttp.WSMsgType.BINARY:
                self._audio_in(msg.data)
            elif t == aiohttp.WSMsgType.TEXT:
                self.counters.messages_in += 1
                await self._command(ws, msg.data)
            elif t in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                       aiohttp.WSMsgType.CLOSED):
                code = ws.close_code
                if t == aiohttp.WSMsgType.CLOSE and isinstance(msg.data, int):
                    # The server's own code: aiohttp reports a close frame without one as
                    # data 0 (and ws.close_code 1006 once the TCP connection goes).
                    code = msg.data or NO_STATUS
                if code in NORMAL_CLOSE:
                    await self._drain()
                    raise _Ended("closed", f"the server closed the socket ({code})", code)
                if code is not None and code != 1006:
                    raise _Refused(f"the server closed the socket with code {code}"
                                   + (f": {msg.extra}" if msg.extra else ""), code)
                raise _Ended("dropped", "the connection was lost", code)
            elif t == aiohttp.WSMsgType.ERROR:
                # aiohttp hands the error in the message (ws.exception() stays None for a
                # frame over max_msg_size and the like).
                exc = msg.data if isinstance(msg.data, BaseException) else ws.exception()
                if isinstance(exc, aiohttp.WebSocketError):
                    # A frame over max_message_bytes, a protocol violation: refuse it loudly.
                    self.counters.bad_frames += 1
                    raise _Refused(f"websocket error: {exc}", ws.close_code)
                raise _Ended("dropped", f"websocket error: {exc}", ws.close_code)

    def _audio_in(self, data: bytes) -> None:
        audio = self._audio
        if audio is None or not data:
            return
        self.counters.audio_in_bytes += len(data)
        if self._in_rs is None:
            self._in_rs = Resampler(self.request.playback_rate, audio.clock_rate)
        pcm = self._in_rs.process(data)
        if pcm:
            self._queue_audio(audio, pcm)

    def _queue_audio(self, audio: AudioPort, pcm: bytes) -> bool:
        if not audio.play(pcm):
            self._error(f"playback queue full ({self._settings.max_queued_s:g} s): audio dropped")
            return False
        self._queued_s += len(pcm) / (2 * audio.clock_rate)
        return True

    def _error(self, text: str) -> None:
        """An error frame to the server, at most ERROR_BURST at once and one a second after."""
        now = time.monotonic()
        self._err_budget = min(ERROR_BURST, self._err_budget + (now - self._err_at))
        self._err_at = now
        if self._err_budget >= 1:
            self._err_budget -= 1
            self._send_text(m.error(text))

    def _cue_room(self) -> bool:
        if self._pending_cues >= MAX_PENDING_CUES:
            self._error(f"more than {MAX_PENDING_CUES} marks and clips pending: ignored")
            return False
        return True

    async def _command(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        try:
            cmd = m.parse(text)
        except m.BadFrame as e:
            self.counters.bad_frames += 1
            self._error(str(e))
            return
        audio = self._audio
        if isinstance(cmd, m.PlayAudio):
            if audio is not None:
                self._play_clip(audio, cmd.data)
        elif isinstance(cmd, m.KillAudio):
            if audio is not None:
                audio.kill()  # pending cues (marks, clips) are answered False
                self._in_rs = None  # the filter's few held samples belong to dropped audio
                self._queued_s = 0.0
        elif isinstance(cmd, m.Mark):
            self._mark(audio, cmd.data.name)
        elif isinstance(cmd, m.ClearMarks):
            for name in self._marks.values():
                self._send_text(m.mark(name, False))
            self._marks.clear()
        elif isinstance(cmd, m.Disconnect):
            await self._drain()
            raise _Ended("disconnect", "the server sent disconnect", None)
        elif isinstance(cmd, m.Handover):
            await self._drain()
            raise _Ended("handover", "the server handed the call over", None, cmd.data or {})
        elif isinstance(cmd, m.ServerError):
            detail = cmd.message or (str(cmd.data.get("message", "")) if cmd.data else "")
            raise _Refused(f"the server sent an error: {detail or 'no detail'}")

    def _play_clip(self, audio: AudioPort, data: m.PlayAudioData) -> None:
        if not self._cue_room():
            return
        try:
            raw = base64.b64decode(data.audio_content, validate=True)
        except (binascii.Error, ValueError):
            self._error("playAudio: audioContent is not base64")
            return
        room_s = self._settings.max_queued_s
        try:
            if data.audio_content_type == "wav":
                # Checked before decoding: a header's rate or length is the sender's word.
                info = sf.info(io.BytesIO(raw))
                if info.format not in ("WAV", "WAVEX") or info.channels > 2:
                    self._error(f"playAudio: a {info.format} file with {info.channels} "
                                "channel(s); mono or stereo WAV only")
                    return
                if not 4000 <= info.samplerate <= 384000:
                    self._error(f"playAudio: a WAV at {info.samplerate} Hz (4000-384000 only)")
                    return
                if info.frames / info.samplerate > room_s:
                    self._error(f"playAudio: {info.frames / info.samplerate:.0f} s of audio "
                                f"(at most {room_s:g} s)")
                    return
                samples, rate = sf.read(io.BytesIO(raw), dtype="int16", always_2d=True)
                mono = samples.mean(axis=1).astype(np.int16) if samples.shape[1] > 1 \
                    else samples[:, 0]
                pcm, src = mono.tobytes(), int(rate)
            else:
                pcm, src = raw[: len(raw) // 2 * 2], data.sample_rate or self.request.playback_rate
                if len(pcm) / 2 / src > room_s:
                    self._error(f"playAudio: {len(pcm) / 2 / src:.0f} s of audio "
                                f"(at most {room_s:g} s)")
                    return
            pcm = resample_clip(pcm, src, audio.clock_rate)
        except Exception as e:  # soundfile's errors, a rate soxr refuses
            self._error(f"playAudio: cannot decode the audio: {e}")
            return
        self._clips += 1
        index = self._clips
        if not self._queue_audio(audio, pcm):
            return
        self._pending_cues += 1

        def done(played: bool) -> None:
            self._pending_cues -= 1
            if played and self._ws is not None:
                self._send_text(m.play_done(index, True))

        audio.cue(done)

    def _mark(self, audio: AudioPort | None, name: str) -> None:
        if not self._cue_room():
            return
        self._mark_seq += 1
        token = self._mark_seq
        self._marks[token] = name
        self._pending_cues += 1

        def answered(played: bool) -> None:
            self._pending_cues -= 1
            if self._marks.pop(token, None) is not None and self._ws is not None:
                self._send_text(m.mark(name, played))

        if audio is None:
            answered(True)
        else:
            audio.cue(answered)

    async def _drain(self) -> None:
        """Let the playback already queued finish (a graceful end), bounded by its length."""
        audio = self._audio
        if audio is None or self._queued_s <= 0:
            return
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def played(ok: bool) -> None:
            if not done.done():
                done.set_result(ok)

        audio.cue(played)
        with contextlib.suppress(TimeoutError):
            bound = min(self._queued_s, self._settings.max_queued_s)
            async with asyncio.timeout(bound + DRAIN_SLACK_S):
                await done

    # -- helpers --------------------------------------------------------------------------
    async def _close_ws(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await ws.close()

    def _post_status(self, event: str, error: str | None) -> None:
        if self._status is not None:
            self._spawn(self._status(event, error))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._status_tasks.add(task)
        task.add_done_callback(self._status_tasks.discard)

    def __repr__(self) -> str:  # never the token
        return f"StreamForkRunner({self._call.call_id!r}, {self.name!r})"


def _describe(e: BaseException, url: str) -> str:
    if isinstance(e, TimeoutError):
        return f"{url}: no answer to the upgrade in time"
    if isinstance(e, aiohttp.WSServerHandshakeError):
        return f"{url}: HTTP {e.status} on the upgrade"
    return f"{url}: {type(e).__name__}: {e}"
