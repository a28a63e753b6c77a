"""Adapts a `media` SIP call to the DSL's `CallLeg` contract (media never imports dsl)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from dsl.context import CallEnded, RecordResult
from media.call import CallGone, SipCall

T = TypeVar("T")
APP_FINAL = {"X-Sautikit-Final": "app"}


async def _guard(aw: Awaitable[T]) -> T:
    try:
        return await aw
    except CallGone as e:
        raise CallEnded() from e


class SipCallLeg:
    def __init__(
        self,
        call: SipCall,
        call_id: str,
        beep: Callable[[], Awaitable[Path]],
        on_recording: Callable[[str, str], None] | None = None,
    ) -> None:
        self.call = call
        self.call_id = call_id
        self._beep = beep
        # (recording id = the file's stem, "in_progress" | "failed"): the API's 202 / 404
        self._on_recording = on_recording

    @property
    def answered(self) -> bool:
        return self.call.answered

    @property
    def ended(self) -> bool:
        return self.call.ended

    async def answer(self) -> None:
        await _guard(self.call.answer())

    async def reject(self, sip_code: int) -> None:
        # The app's decision: the SIP front must relay it, not try the call on another worker.
        await self.call.reject(sip_code, APP_FINAL)

    async def hangup(self) -> None:
        await self.call.hangup()

    async def play(self, wav: Path, *, stop: asyncio.Event | None = None) -> bool:
        return await _guard(self.call.play(wav, stop=stop))

    async def wait(self, seconds: float) -> None:
        await _guard(self.call.wait(seconds))

    def next_digit_nowait(self) -> str | None:
        return self.call.next_digit_nowait()

    async def next_digit(self, timeout: float | None) -> str | None:
        return await _guard(self.call.next_digit(timeout))

    def flush_digits(self) -> None:
        self.call.flush_digits()

    def listen_for_digits(self, on: bool) -> None:
        self.call.listen_for_digits(on)

    async def record(
        self,
        dest: Path,
        *,
        max_length_s: float,
        silence_timeout_s: float,
        finish_on_key: str,
        beep: bool,
    ) -> RecordResult:
        beep_wav = await self._beep() if beep else None
        if self._on_recording is not None:
            self._on_recording(dest.stem, "in_progress")
        try:
            rec = await _guard(
                self.call.record(
                    dest,
                    max_length_s=max_length_s,
                    silence_timeout_s=silence_timeout_s,
                    finish_on_key=finish_on_key,
                    beep=beep_wav,
                )
            )
        except BaseException:  # interrupted (a redirect discards it) or no media
            if self._on_recording is not None:
                self._on_recording(dest.stem, "failed")
            raise
        return RecordResult(rec.path, rec.duration_s, rec.ended_by, rec.digit)
