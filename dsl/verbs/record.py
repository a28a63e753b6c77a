"""`record`: record the caller, announce the file, and POST the result to the voice app."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import suppress
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from dsl.context import CallContext, VoiceAppError
from dsl.verbs.base import (
    DTMF_KEY_PATTERN,
    Needs,
    RunState,
    Step,
    Verb,
    end,
    extension,
    reply_step,
)

log = logging.getLogger(__name__)


class Record(Verb):
    """Record what the caller says into a WAV file.

    Recording stops at `finishOnKey`, after `timeout` seconds of silence, at `maxLength`, or
    when the caller hangs up. The gateway then emits `call.recording.ready` and requests
    `action` with `RecordingUrl`, `RecordingDuration` (whole seconds), `recordingId` and, when
    the finish key ended it, `Digits`. A non-empty reply document replaces the rest of this
    one. If the caller hung up, the event and the request still happen and the run ends.

    A live redirect (`POST /v1/calls/{id}/redirect`) while recording discards it: the partial
    file is deleted, no event, no request. A hangup through the API ends it like the caller's
    hangup: the file is kept and reported.
    """

    verb: ClassVar[str] = "record"
    needs: ClassVar[Needs] = "media"
    ends_with_call: ClassVar[bool] = True

    action: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="URL the result is sent to (relative resolves against the document's "
        "URL); default the call's voice_callback_url.",
    )
    method: Literal["GET", "POST"] = Field("POST", description="HTTP method for `action`.")
    timeout: float = Field(
        5, ge=0, le=3600, description="Seconds of silence that stop it; 0 = the default (5)."
    )
    max_length: float = Field(
        3600, ge=0, le=14400, description="Longest recording in seconds; 0 = the default (3600)."
    )
    finish_on_key: str = Field(
        "",
        pattern=DTMF_KEY_PATTERN,
        description='Key that stops it: one of 0-9 * #, or "" for none.',
    )
    transcribe: bool = Field(
        False, description="Ask for a transcription (accepted; this gateway does not transcribe)."
    )
    transcribe_callback: str | None = Field(
        None, max_length=2048, description="Where a transcription would be sent (unused)."
    )
    play_beep: bool = extension(True, description="Beep before recording starts.")
    trim_silence: bool = extension(
        False, description="Trim leading/trailing silence (accepted; not applied yet)."
    )
    format: Literal["wav"] = extension("wav", description="File format of the recording.")

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        leg = ctx.leg
        recording_id = uuid.uuid4().hex
        # No type-ahead here (unlike getDigits): a key pressed during an earlier prompt would
        # otherwise end the recording before the caller said a word.
        leg.flush_digits()
        try:
            result = await leg.record(
                ctx.recordings_dir / f"{recording_id}.{self.format}",
                # The SDK writes 0 for "the platform default": the model's own defaults.
                max_length_s=self.max_length or _default("max_length"),
                silence_timeout_s=self.timeout or _default("timeout"),
                finish_on_key=self.finish_on_key,
                beep=self.play_beep,
            )
        except asyncio.CancelledError:
            _discard(ctx.recordings_dir, recording_id)
            raise
        # The file is kept from here: telling the gateway (hash, store the event, `ready` to
        # the API) finishes even if a redirect stops this verb meanwhile; only waiting for
        # it is cancelled (else the recording stays in_progress, its event half told).
        report = asyncio.ensure_future(
            ctx.events.recording_ready(recording_id, result.path, result.duration_s, self.format)
        )
        _reporting.add(report)
        report.add_done_callback(_reported)
        url = await asyncio.shield(report)
        extra = {
            "RecordingUrl": url,
            "RecordingDuration": str(round(result.duration_s)),
            "recordingId": recording_id,
        }
        if result.digit:
            extra["Digits"] = result.digit
        target = state.resolve(self.action) if self.action else ctx.voice_callback_url
        if result.ended_by == "hangup":
            # The voice app still learns of the recording; its reply has no call to run on.
            try:
                await ctx.app.fetch(target, self.method, extra)
            except VoiceAppError as err:
                state.note(err.code, err.message)
            return end("caller")
        return reply_step(await ctx.app.fetch(target, self.method, extra))


_reporting: set[asyncio.Future[str]] = set()  # reports whose verb may be gone: kept alive


def _reported(report: asyncio.Future[str]) -> None:
    _reporting.discard(report)
    if not report.cancelled() and (exc := report.exception()) is not None:
        log.error("recording could not be reported: %s", exc)


def _discard(recordings_dir: Path, recording_id: str) -> None:
    """Delete what an interrupted recording left: the final file or the recorder's partial one
    (whatever its name, it holds the id; nothing else does)."""
    for path in recordings_dir.glob(f"*{recording_id}*"):
        with suppress(OSError):
            path.unlink()  # the recorder may still hold it open: fine, the inode goes with it
    log.info("recording %s: interrupted, discarded", recording_id)


def _default(name: str) -> float:
    value = Record.model_fields[name].default
    assert isinstance(value, int | float)
    return float(value)
