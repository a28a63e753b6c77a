"""A call's streams (dsl `Streams`): opened by `stream` / `aiAgent`, stopped by the API
(`StreamStop`), every one closed when the call ends.

Status callbacks (`statusCallback` + `statusEvents`): JSON POSTs signed with the number's
secret like voice callbacks (the call's voice app client sends them): the call's fields plus
`event`, `callId`, `streamName`, `streamUrl`, `timestamp` (RFC 3339) and `error` for
stream-error; the reply is not used.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from config.settings import AiAgentsSettings, CallbacksSettings, StreamsSettings
from dsl.context import (
    AgentRuntime,
    CallEnded,
    MediaError,
    StreamRequest,
    VoiceApp,
    VoiceAppError,
)
from gateway.streams.fork import (
    AudioPort,
    CallInfo,
    StatusSink,
    StreamForkRunner,
    guard_ws_url,
)

if TYPE_CHECKING:
    from media.call import CallEnd, SipCall

log = logging.getLogger(__name__)

# The rates a stream may run at, both ways (play's rule): upsampling from a rate far below the
# call's would multiply each frame's size (a memory hazard with 4 MiB frames), and a rate
# under 50 Hz has no whole sample in a 20 ms frame.
MIN_RATE, MAX_RATE = 4000, 384000
TRACK = {"inbound_track": "inbound", "outbound_track": "outbound", "both_tracks": "both"}


class CallStreams:
    """The forks of one call, by name."""

    def __init__(
        self,
        *,
        call: SipCall | None,
        info: CallInfo,
        app: VoiceApp,
        post: Callable[[str, Mapping[str, Any]], Awaitable[None]] | None = None,
        http: aiohttp.ClientSession,
        agent_http: aiohttp.ClientSession | None = None,
        streams: StreamsSettings,
        agents: AiAgentsSettings,
        callbacks: CallbacksSettings,
        audio: Callable[[StreamRequest, Callable[[bytes], None]], AudioPort] | None = None,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self._call = call
        self._info = info
        self._app = app
        self._post = post
        self._http = http  # guarded: document URLs
        self._agent_http = agent_http or http  # the operator's runtime: not guarded
        self._settings = streams
        self._agents = agents
        self._callbacks = callbacks
        self._audio = audio or self._media_audio
        self._on_change = on_change  # (event, detail) for metrics: "open", "end:<reason>"
        self._forks: dict[str, StreamForkRunner] = {}
        self._numbers = itertools.count(1)
        self._closed = False
        self.agent: AgentRuntime | None = (
            AgentRuntime(agents.url, agents.sample_rate) if agents.url else None
        )
        if call is not None:
            call.dtmf_listeners.append(self._dtmf)
            call.on_end.append(self._call_ended)

    @property
    def running(self) -> list[str]:
        return list(self._forks)

    async def open(self, request: StreamRequest) -> StreamForkRunner:
        if self._closed:
            raise CallEnded()
        for what, rate in (("bidirectionalSamplingRate", request.playback_rate),
                           ("outputSamplingRate", request.output_rate)):
            if not MIN_RATE <= rate <= MAX_RATE:
                raise MediaError("stream_rate_unsupported",
                                 f"{what} {rate} Hz: streams run at {MIN_RATE}-{MAX_RATE} Hz")
        if request.purpose == "stream":
            await guard_ws_url(request.url, allow_http=self._callbacks.allow_http,
                               allow_private=self._callbacks.allow_private)
        name = request.name or f"stream-{next(self._numbers)}"
        old = self._forks.get(name)
        if old is not None:  # the same name again: the new fork replaces the old one
            await old.stop()
        if self._closed:  # the call ended while this waited
            raise CallEnded()
        token = None
        if request.purpose == "ai_agent" and self._agents.token is not None:
            token = self._agents.token.get_secret_value()

        def audio(on_audio: Callable[[bytes], None]) -> AudioPort:
            return self._audio(request, on_audio)

        fork = StreamForkRunner(
            request, name,
            http=self._agent_http if request.purpose == "ai_agent" else self._http,
            audio=audio, call=self._info,
            settings=self._settings, status=self._status_sink(request, name), token=token,
            on_end=self._forgotten,
        )
        self._forks[name] = fork
        fork.start()
        if self._on_change is not None:
            self._on_change("open", request.purpose)
        return fork

    async def stop(self, name: str | None = None) -> int:
        forks = [f for n, f in self._forks.items() if name is None or n == name]
        for fork in forks:
            await fork.stop()
        return len(forks)

    def close_all(self) -> None:
        """The call is over: every fork stops (their ends resolve at once)."""
        self._closed = True
        for fork in list(self._forks.values()):
            try:
                fork.stop_now()
            except Exception:  # a call-end hook: the others must still run
                log.exception("call %s: stream %s: stop failed", self._info.call_id, fork.name)

    # -- internals ------------------------------------------------------------------------
    def _media_audio(self, request: StreamRequest, on_audio: Callable[[bytes], None]) -> AudioPort:
        from media.fork import AudioFork

        assert self._call is not None
        fork = AudioFork(self._call, TRACK[request.track], on_audio,  # type: ignore[arg-type]
                         jitter_ms=self._settings.jitter_ms,
                         max_queued_s=self._settings.max_queued_s)
        fork.start()
        return fork

    def _forgotten(self, fork: StreamForkRunner) -> None:
        if self._forks.get(fork.name) is fork:
            del self._forks[fork.name]
        if self._on_change is not None and fork.ended.done():
            self._on_change("end", fork.ended.result().reason)

    def _dtmf(self, digit: str, duration_ms: int) -> None:
        for fork in list(self._forks.values()):
            fork.on_dtmf(digit, duration_ms)

    def _call_ended(self, _end: CallEnd) -> None:
        self.close_all()

    def _status_sink(self, request: StreamRequest, name: str) -> StatusSink | None:
        url, wanted = request.status_callback, request.status_events
        if url is None or not wanted:
            return None
        send = self._post
        if send is None:
            return None
        info = self._info

        async def post(event: str, error: str | None) -> None:
            if event not in wanted:
                return
            body: dict[str, Any] = {
                **dict(info.fields), "event": event, "callId": info.call_id,
                "streamName": name, "streamUrl": request.url, "timestamp": _now()}
            if error:
                body["error"] = error
            try:
                await send(url, body)
            except VoiceAppError as e:
                log.info("call %s: stream %s: status POST to %s: %s", info.call_id, name, url, e)
            except Exception:
                log.exception("call %s: stream %s: status POST failed", info.call_id, name)

        return post


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
