"""`stream`: fork the call's audio to a WebSocket server (audio.drachtio.org subprotocol).

The fork itself (connecting, retries, the wire protocol, status callbacks) is the gateway's
(`ctx.streams`, gateway/streams/); this verb turns the SDK's parameters into a plain
`StreamRequest`, opens the fork, and with `connect` holds the call until the fork ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from dsl.context import CallContext, CallEnded, StreamEnd, StreamFork, StreamRequest
from dsl.errors import VerbUnsupported, suggest
from dsl.verbs.base import NEXT, Needs, RunState, Step, Verb

log = logging.getLogger(__name__)

STATUS_EVENTS = ("stream-started", "stream-stopped", "stream-error")
MAX_RATE = 384000
DEFAULT_RATE = 8000
# Ends that mean the server could not be used; noted as `stream_<reason>` (the call goes on).
FAILED_ENDS = ("refused", "unreachable", "dropped")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def _rate(description: str, default: float | None) -> Any:
    return Field(default, gt=0, le=MAX_RATE, description=description)


def to_hz(rate: float) -> int:
    """A rate as the SDK's `number` allows it (22050.5) in whole Hz, half up; at least 1."""
    return max(1, math.floor(rate + 0.5))


def _invalid(message: str, **ctx: Any) -> PydanticCustomError:
    # `param_message`: the document error keeps this message as written (see dsl/document.py).
    return PydanticCustomError("param_message", message, ctx or None)


class Stream(Verb):
    """Send the call's audio to a WebSocket server (the `audio.drachtio.org` subprotocol, as
    jambonz's `listen` speaks it; the wire protocol is described in
    [docs/streams.md](streams.md)).

    The server receives a first text frame with the call's attributes (`callId`, `from`, `to`,
    `sampleRate`, `mixType`, `headers` from `headerMetadata`, `metadata` from `openMetadata`),
    then 16-bit little-endian PCM frames, 20 ms each, at `outputSamplingRate`. Audio it sends
    back (binary L16 at `bidirectionalSamplingRate`, or `playAudio` clips) is played to the
    caller; `killAudio`, `mark`, `clearMarks` and `disconnect` work as in jambonz.

    With `connect` the call is held while the socket lives: the document goes on with its next
    action when the socket closes, the server sends `disconnect`, the stream is stopped
    (`POST /v1/calls/{id}/stream`), or the server cannot be reached (after at most two retries
    within 5 s; `stream-error` is posted). Without it the fork runs in the background while
    the document goes on, until the call ends or the stream is stopped. A URL the gateway
    refuses (private addresses) skips the action. `statusEvents` (default all three when
    `statusCallback` is given) are POSTed, signed like voice callbacks, to `statusCallback`.
    """

    verb: ClassVar[str] = "stream"
    needs: ClassVar[Needs] = "media"

    url: str = Field(
        pattern=r"^wss?://[^\s]+$", max_length=2048, description="ws:// or wss:// server URL."
    )
    track: Literal["inbound_track", "outbound_track", "both_tracks"] = Field(
        "inbound_track",
        description="Which audio to send: the caller's, what the gateway plays to the caller, "
        "or both (2 channels interleaved, caller left).",
    )
    connect: bool = Field(False, description="Hold the call for the socket's life.")
    output_sampling_rate: float = _rate(
        "Rate (Hz) of the 16-bit LE PCM frames sent to the server, e.g. 8000, 16000, 24000; "
        "rounded to whole Hz.",
        DEFAULT_RATE,
    )
    bidirectional_sampling_rate: float = _rate(
        "Rate (Hz) of the binary audio the server sends back; rounded to whole Hz.", DEFAULT_RATE
    )
    name: str | None = Field(
        None, max_length=128, description='Name of this stream; default "stream-1", ...'
    )
    input_sampling_rate: float | None = _rate(
        "Rate (Hz) of the call's audio (informational; not used).", None
    )
    header_metadata: str | None = Field(
        None,
        max_length=8192,
        description="A JSON object serialised as a string (`JSON.stringify({...})`): the first "
        "text frame's `headers` (not HTTP headers).",
    )
    open_metadata: str | dict[str, Any] | None = Field(
        None, description="Opaque metadata: the first text frame's `metadata`, as given."
    )
    status_callback: str | None = Field(
        None,
        max_length=2048,
        description="http(s) URL that receives stream status events (relative resolves "
        "against the document's URL).",
    )
    status_events: str | list[str] | None = Field(
        None,
        description='Space- or comma-separated (or a list): "stream-started stream-stopped '
        'stream-error"; default all three.',
    )

    @field_validator("header_metadata", mode="before")
    @classmethod
    def _header_metadata(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise _invalid(
                "expected a JSON object serialised as a string, e.g. "
                "JSON.stringify({\"tenant\": \"acme\"})"
            )
        try:
            parsed = json.loads(value)
        except ValueError:
            raise _invalid("expected a JSON object serialised as a string; not JSON") from None
        if not isinstance(parsed, dict):
            raise _invalid(
                "expected a JSON object serialised as a string, got a serialised {kind}",
                kind=type(parsed).__name__.replace("NoneType", "null"),
            )
        return value

    @field_validator("status_callback")
    @classmethod
    def _status_callback(cls, value: str | None) -> str | None:
        if value is not None:
            scheme = _SCHEME.match(value)
            if scheme is not None and scheme.group(1).lower() not in ("http", "https"):
                raise _invalid("expected an http:// or https:// URL")
        return value

    @field_validator("status_events", mode="before")
    @classmethod
    def _status_events(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = split_events(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            names = [n for v in value for n in split_events(v)]
        else:
            return value  # None, or a wrong type: the field's own error
        for name in names:
            if name not in STATUS_EVENTS:
                hint = suggest(name, STATUS_EVENTS)
                raise _invalid(
                    f"unknown status event {json.dumps(name)}; "
                    + (f"did you mean {hint}?" if hint else "expected " + " or ".join(
                        (", ".join(STATUS_EVENTS[:-1]), STATUS_EVENTS[-1])))
                )
        return value

    def events(self) -> frozenset[str]:
        """The status events to POST: those named, all three when none are, none without
        a statusCallback."""
        if self.status_callback is None:
            return frozenset()
        if self.status_events is None:
            return frozenset(STATUS_EVENTS)
        given = [self.status_events] if isinstance(self.status_events, str) else self.status_events
        return frozenset(n for v in given for n in split_events(v))

    def request(self, state: RunState) -> StreamRequest:
        callback = state.resolve(self.status_callback) if self.status_callback else None
        if callback is not None and not callback.lower().startswith(("http://", "https://")):
            state.note("stream_status_callback", f"not an http(s) URL, ignored: {callback}")
            callback = None
        headers = json.loads(self.header_metadata) if self.header_metadata else None
        return StreamRequest(
            url=self.url,
            track=self.track,
            connect=self.connect,
            output_rate=to_hz(self.output_sampling_rate),
            playback_rate=to_hz(self.bidirectional_sampling_rate),
            name=self.name,
            headers=headers,
            metadata=self.open_metadata,
            status_callback=callback,
            status_events=self.events() if callback is not None else frozenset(),
        )

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        if ctx.streams is None:
            raise VerbUnsupported(self.verb)
        # A MediaError (url_forbidden) propagates: the interpreter skips the action, noted.
        fork = await ctx.streams.open(self.request(state))
        if not self.connect:
            log.info("call %s: %s: stream %s forked", state.call_id, state.path, fork.name)
            return NEXT
        ended = await hold(ctx, fork)
        log.info("call %s: %s: stream %s ended (%s)", state.call_id, state.path, fork.name,
                 ended.reason)
        if ended.reason in FAILED_ENDS:
            state.note(f"stream_{ended.reason}", ended.message or f"stream {fork.name} failed")
        return NEXT


def split_events(value: str) -> list[str]:
    return [n for n in re.split(r"[\s,]+", value) if n]


async def hold(ctx: CallContext, fork: StreamFork) -> StreamEnd:
    """Wait for the fork's end while the call lives: its StreamEnd, or CallEnded when the
    call ends first. However this stops (the call's end, an interrupt cancelling the verb),
    a fork still running is stopped before it returns or raises."""
    alive = asyncio.ensure_future(_while_call_lives(ctx))
    try:
        either: set[asyncio.Future[Any]] = {fork.ended, alive}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if ctx.leg.ended:  # the call's end stops its forks too: that end is the call's
            raise CallEnded()
        if fork.ended.done():
            return fork.ended.result()
        alive.result()  # raises CallEnded
        raise CallEnded()  # (never reached: it never returns otherwise)
    finally:
        alive.cancel()
        if alive.done() and not alive.cancelled():
            alive.exception()  # retrieved: it may have ended with the fork
        if not fork.ended.done():
            try:
                await fork.stop()
            except Exception:  # never hide why we stopped (a CallEnded, a cancellation)
                log.exception("stream %s: stop failed", fork.name)


async def _while_call_lives(ctx: CallContext) -> None:
    """Raises CallEnded when the call ends (never returns otherwise)."""
    while True:
        await ctx.leg.wait(3600)
