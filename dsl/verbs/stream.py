"""`stream`: fork the call's audio to a WebSocket server (not yet runnable)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from dsl.context import CallContext
from dsl.errors import VerbUnsupported
from dsl.verbs.base import Needs, RunState, Step, Verb

Rate = Literal[8000, 16000]  # outputSamplingRate: what the SDK documents


class Stream(Verb):
    """Send the call's audio to a WebSocket server (audio.drachtio.org subprotocol).

    With `connect` the call is held for the fork's life and audio sent back is played.
    Validated now; running it ends the call with `verb_unsupported` until streaming lands.
    """

    verb: ClassVar[str] = "stream"
    needs: ClassVar[Needs] = "media"

    url: str = Field(
        pattern=r"^wss?://[^\s]+$", max_length=2048, description="ws:// or wss:// server URL."
    )
    track: Literal["inbound_track", "outbound_track", "both_tracks"] = Field(
        "inbound_track", description="Which audio to send: the caller's, ours, or both."
    )
    connect: bool = Field(False, description="Hold the call for the fork's life.")
    output_sampling_rate: Rate = Field(
        8000, description="Rate of the 16-bit LE PCM frames sent to the server."
    )
    bidirectional_sampling_rate: int | float | None = Field(
        None, gt=0, le=384000, description="Rate (Hz) of audio the server sends back."
    )
    name: str | None = Field(None, max_length=128, description="Name of this stream.")
    input_sampling_rate: int | float | None = Field(
        None, gt=0, le=384000, description="Rate (Hz) of the call's audio."
    )
    header_metadata: str | None = Field(
        None,
        max_length=8192,
        description="A JSON object serialised as a string, sent in the first text frame.",
    )
    open_metadata: str | dict[str, Any] | None = Field(
        None, description="Metadata sent when the stream opens."
    )
    status_callback: str | None = Field(
        None, max_length=2048, description="URL that receives stream status events."
    )
    status_events: str | list[str] | None = Field(
        None, description="Which stream status events to send."
    )

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        raise VerbUnsupported(self.verb)
