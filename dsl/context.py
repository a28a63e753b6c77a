"""What a verb may do to a call: the contract between `dsl` and the rest of the gateway.

`dsl` knows nothing of SIP. The gateway hands the interpreter a `CallContext` whose parts are
implemented by `media` (the call leg, prompts) and `gateway` (the voice app client, events).
Unit tests implement it with fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol


class CallEnded(Exception):
    """The far end hung up (or the call was torn down): the current verb stops, the rest drop."""


class VoiceAppError(Exception):
    """The voice app could not give a usable document.

    `code` is stable and machine-readable (it becomes `call.failed.data.reason`):
    `callback_http_status`, `callback_timeout`, `callback_unreachable`, `callback_not_json`,
    `document_invalid`, `url_forbidden`, `redirect_loop`, `dial_loop`, `ai_agent_loop`,
    `forward_unavailable`.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MediaError(Exception):
    """A prompt could not be produced (TTS failed, audio URL unreachable or undecodable).

    `code`: `tts_failed`, `media_fetch_failed`, `media_decode_failed`, `url_forbidden`.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RecordResult:
    path: Path  # final file (already atomically in place), 16-bit PCM WAV at the bridge rate
    duration_s: float
    ended_by: Literal["finishOnKey", "maxLength", "silence", "hangup"]
    digit: str | None = None  # the finishOnKey digit that ended it, if any


class CallLeg(Protocol):
    """One call as the DSL sees it. Every awaitable raises `CallEnded` once the call is gone."""

    call_id: str

    @property
    def answered(self) -> bool: ...

    @property
    def ended(self) -> bool: ...

    async def answer(self) -> None:
        """Answer (200 OK) and wait until media flows. No-op if already answered."""

    async def reject(self, sip_code: int) -> None:
        """Refuse an unanswered call with a final SIP response (e.g. 603, 486)."""

    async def hangup(self) -> None:
        """End the call (BYE, or a final response if unanswered). Idempotent."""

    async def play(self, wav: Path, *, stop: asyncio.Event | None = None) -> bool:
        """Play a 16-bit PCM mono WAV at the bridge rate to the far end, once.

        Returns True when it played to the end, False when `stop` was set first.
        """

    def next_digit_nowait(self) -> str | None:
        """The oldest buffered DTMF digit not yet consumed, or None."""

    async def next_digit(self, timeout: float | None) -> str | None:
        """Wait for the next DTMF digit (any method, one per key press); None on timeout."""

    async def wait(self, seconds: float) -> None:
        """Sleep while the call lives (for `pause`); raises CallEnded if it ends first."""

    def flush_digits(self) -> None:
        """Forget buffered digits."""

    def listen_for_digits(self, on: bool) -> None:
        """Turn in-band (audio) DTMF detection on/off; out-of-band digits always arrive."""

    async def record(
        self,
        dest: Path,
        *,
        max_length_s: float,
        silence_timeout_s: float,
        finish_on_key: str,
        beep: bool,
    ) -> RecordResult:
        """Record what the far end says into `dest`, written atomically.

        A hangup mid-recording ends it with ended_by="hangup" and the file kept (no CallEnded).
        """


class Prompts(Protocol):
    """Turns `say` text and `play` URLs into WAV files at the bridge rate (cached)."""

    async def tts(self, text: str, voice: str | None, language: str | None) -> Path: ...

    async def audio(self, url: str) -> Path:
        """Fetch (SSRF-checked, cached) and convert an audio URL; raises MediaError."""


@dataclass(frozen=True)
class FetchedDocument:
    body: Any  # the parsed JSON reply, not yet validated
    url: str  # the URL that produced it; relative redirects resolve against it


class VoiceApp(Protocol):
    async def fetch(
        self, url: str, method: str, extra: Mapping[str, str] | None = None
    ) -> FetchedDocument:
        """Request a document (signed, form-encoded call state + `extra`); raises VoiceAppError."""


class CallEvents(Protocol):
    async def recording_ready(
        self, recording_id: str, path: Path, duration_s: float, fmt: str
    ) -> str:
        """Emit `call.recording.ready` (durably) and return the recording's URL."""


class RoomRefused(Exception):
    """A conference would not take the call (`code`: `room_full`, `unavailable`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RoomEntry:
    """What the `conference` verb asks of the gateway's rooms."""

    name: str  # per workspace: the gateway knows the call's
    muted: bool = False
    beep: bool = False
    start_on_enter: bool = True
    end_on_exit: bool = False
    max_participants: int = 0  # 0: the gateway's default
    flags: tuple[str, ...] = ()
    wait_tone: bool = True  # the built-in hold tone while the room has not started
    record_to: Path | None = None  # record the room's mix there while this call is in it


@dataclass(frozen=True)
class RoomNotice:
    """A room status event: start, end, join, leave (`call_id`: the participant)."""

    event: str
    call_id: str
    count: int


@dataclass(frozen=True)
class RoomLeft:
    count: int  # participants left in the room
    recording: tuple[Path, float] | None = None  # (file, seconds) when record_to was given


class RoomSeat(Protocol):
    """A call's place in a room, from join until `leave`."""

    room_id: str
    started: asyncio.Event  # set once the room has started (at once when it had)
    left: asyncio.Future[str]  # resolves with why the room let go of the call: kicked, ended
    notices: asyncio.Queue[RoomNotice]

    async def leave(self) -> RoomLeft:
        """Out of the room (idempotent); the recording, if any, is complete."""

    def hold_tone_while_waiting(self) -> None:
        """Hear the built-in hold tone until the room starts (the waitUrl gave nothing)."""


class Rooms(Protocol):
    async def join(self, call_id: str, entry: RoomEntry) -> RoomSeat:
        """Enter the room (the call is answered); raises RoomRefused."""
DialStatus = Literal["completed", "busy", "no-answer", "failed", "canceled"]


@dataclass(frozen=True)
class DialTarget:
    kind: Literal["number", "sip", "client"]
    value: str  # E.164 (normalised by the verb's model), a sip:/sips: URI or a client's name


@dataclass(frozen=True)
class DialRequest:
    """What `dial` asks of the gateway: plain values, nothing of SIP."""

    targets: tuple[DialTarget, ...]
    sequential: bool = False  # try targets one after another (else all ring at once)
    caller_id: str | None = None  # None: the gateway's default (the dialled number / `from`)
    timeout_s: float = 30.0  # ring time per attempt
    record: str | None = None  # record-from-answer | record-from-ringing
    time_limit_s: float | None = None  # longest bridged time, from answer


@dataclass(frozen=True)
class DialResult:
    """How a dial ended (Twilio's DialCallStatus & co.). Raised instead: CallEnded (the caller
    hung up; the run ends)."""

    status: DialStatus
    call_sid: str = ""  # the child leg's call_id ("" when no leg was placed)
    duration_s: int = 0  # answered: seconds from answer to end, rounded up
    sip_status: int | None = None  # the leg's final SIP code (200 when it was answered)


class Dialer(Protocol):
    async def dial(self, request: DialRequest) -> DialResult:
        """Ring the targets, bridge the caller to the first that answers, until either side
        hangs up. Raises CallEnded when the caller hangs up."""



StreamTrack = Literal["inbound_track", "outbound_track", "both_tracks"]
StreamEndReason = Literal[
    "closed",  # the server closed the socket normally (1000/1001)
    "disconnect",  # the server sent {"type": "disconnect"}
    "handover",  # the server sent {"type": "handover"} (aiAgent)
    "stopped",  # stopped by the gateway: live control, or the call's end
    "refused",  # the server refused: handshake status, an error close code or an error frame
    "unreachable",  # could not connect (retried at most twice within 5 s)
    "dropped",  # connected, then lost, and reconnecting failed
]


@dataclass(frozen=True)
class StreamRequest:
    """What `stream` (or `aiAgent`'s expansion) asks of the gateway: plain values."""

    url: str  # absolute ws:// or wss:// URL
    track: StreamTrack = "inbound_track"
    connect: bool = False  # True: the verb waits for the fork's end (the call is held)
    output_rate: int = 8000  # Hz of the L16 frames sent to the server (resampled from the call)
    playback_rate: int = 8000  # Hz of binary L16 the server sends back (bidirectionalSamplingRate)
    name: str | None = None  # None: the gateway names it
    headers: Mapping[str, Any] | None = None  # headerMetadata, parsed: the first frame's `headers`
    metadata: Any = None  # openMetadata (a string) or aiAgent's object: first frame's `metadata`
    status_callback: str | None = None  # absolute http(s) URL for stream-* status POSTs
    status_events: frozenset[str] = frozenset()  # of stream-started, stream-stopped, stream-error
    # "ai_agent": the gateway adds the call's attributes and workspace to `metadata`, and the URL
    # is the operator's [ai_agents] url (trusted: not SSRF-checked like a document's URL).
    purpose: Literal["stream", "ai_agent"] = "stream"


@dataclass(frozen=True)
class StreamEnd:
    reason: StreamEndReason
    message: str = ""  # human-readable detail (the close code's meaning, the error frame's text)
    close_code: int | None = None  # the WebSocket close code, when there was one
    handover: Mapping[str, Any] | None = None  # the handover frame's `data`, if any
    connected: bool = False  # the socket was open at some point

    @property
    def unavailable(self) -> bool:
        """The far end could not be used (aiAgent's onUnavailable)."""
        return self.reason in ("refused", "unreachable") or (
            self.reason == "dropped" and not self.connected
        )


class StreamFork(Protocol):
    """A running fork. `ended` resolves exactly once (also when the call ends)."""

    name: str
    ended: asyncio.Future[StreamEnd]

    async def stop(self) -> StreamEnd:
        """Close the fork (idempotent); its end."""


@dataclass(frozen=True)
class AgentRuntime:
    """The operator's voice AI runtime ([ai_agents])."""

    url: str  # ws:// or wss://
    sample_rate: int = 8000  # rate both ways


class Streams(Protocol):
    """A call's audio forks (`stream`, `aiAgent`)."""

    agent: AgentRuntime | None  # None: [ai_agents] url unset

    async def open(self, request: StreamRequest) -> StreamFork:
        """Start a fork on the answered call; returns at once (connecting, its retries and the
        status callbacks run in the fork). A URL the guard refuses raises MediaError
        `url_forbidden`."""

    async def stop(self, name: str | None = None) -> int:
        """Stop the running forks named `name` (all when None); how many were stopped."""

@dataclass
class CallContext:
    leg: CallLeg
    prompts: Prompts
    app: VoiceApp
    events: CallEvents
    voice_callback_url: str
    recordings_dir: Path
    default_digit_timeout_s: float = 5.0
    params: dict[str, str] = field(default_factory=dict)  # persisted fields sent on each fetch
    # (verb, reason) of each action skipped because its media failed, for the gateway's metrics
    on_skip: Callable[[str, str], None] | None = None
    # Asked for the next document when one runs off its end (MCP control); None from it, or no
    # hook, hangs up as usual. The interpreter cancels it when an interrupt arrives.
    next_document: Callable[[], Awaitable[FetchedDocument | None]] | None = None
    # Conference rooms (the `conference` verb); None where the gateway has none.
    rooms: Rooms | None = None
    # Connects the caller to others (`dial`); None: dial is not runnable here.
    dialer: Dialer | None = None
    # Audio forks to WebSocket servers (`stream`, `aiAgent`); None: not runnable here.
    streams: Streams | None = None
