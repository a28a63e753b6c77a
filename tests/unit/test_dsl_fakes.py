"""A fake CallContext for the dsl tests: every call lands, in order, in one `ops` list."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dsl.context import (
    CallContext,
    CallEnded,
    FetchedDocument,
    MediaError,
    RecordResult,
    VoiceAppError,
)

FIRST_URL = "https://app.example/voice/start"
CALLBACK_URL = "https://app.example/voice/callback"


class FakeLeg:
    def __init__(self, ops: list[tuple[Any, ...]], *, answered: bool = False) -> None:
        self.call_id = "call-1"
        self.ops = ops
        self._answered = answered
        self._ended = asyncio.Event()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.play_seconds = 0.02  # how long a prompt "plays" unless stopped
        self.on_play: Callable[[Path], object] | None = None  # press keys / hang up mid-prompt
        self.digits_on_listen: list[str] = []  # keys "pressed" as soon as getDigits listens
        self.record_result: Callable[[Path], RecordResult] = lambda p: RecordResult(
            p, 2.6, "silence"
        )
        self.next_digit_timeouts: list[float | None] = []

    @property
    def answered(self) -> bool:
        return self._answered

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def press(self, *keys: str) -> None:
        for k in keys:
            self.queue.put_nowait(k)

    def end(self) -> None:
        self._ended.set()

    def _check(self) -> None:
        if self.ended:
            raise CallEnded

    async def answer(self) -> None:
        self._check()
        self.ops.append(("answer",))
        self._answered = True

    async def reject(self, sip_code: int) -> None:
        self._check()
        self.ops.append(("reject", sip_code))
        self.end()

    async def hangup(self) -> None:
        self.ops.append(("hangup",))
        self.end()

    async def play(self, wav: Path, *, stop: asyncio.Event | None = None) -> bool:
        self._check()
        self.ops.append(("play", wav.name))
        if self.on_play is not None:
            self.on_play(wav)
        self._check()
        waiter = stop if stop is not None else asyncio.Event()
        try:
            await asyncio.wait_for(waiter.wait(), self.play_seconds)
        except TimeoutError:
            self._check()
            self.ops.append(("played", wav.name))
            return True
        self.ops.append(("stopped", wav.name))
        return False

    def next_digit_nowait(self) -> str | None:
        return None if self.queue.empty() else self.queue.get_nowait()

    async def next_digit(self, timeout: float | None) -> str | None:
        self._check()
        self.next_digit_timeouts.append(timeout)
        if not self.queue.empty():
            return self.queue.get_nowait()
        get = asyncio.ensure_future(self.queue.get())
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            done, _ = await asyncio.wait(
                {get, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (get, ended):
                if not task.done():
                    task.cancel()
        if get in done:
            return get.result()
        if ended in done:
            raise CallEnded
        return None

    async def wait(self, seconds: float) -> None:
        self._check()
        self.ops.append(("wait", seconds))

    def flush_digits(self) -> None:
        self.ops.append(("flush",))
        while not self.queue.empty():
            self.queue.get_nowait()

    def listen_for_digits(self, on: bool) -> None:
        self.ops.append(("listen", on))
        if on:
            self.press(*self.digits_on_listen)

    async def record(
        self,
        dest: Path,
        *,
        max_length_s: float,
        silence_timeout_s: float,
        finish_on_key: str,
        beep: bool,
    ) -> RecordResult:
        self._check()
        self.ops.append(("record", dest, max_length_s, silence_timeout_s, finish_on_key, beep))
        result = self.record_result(dest)
        if result.ended_by == "hangup":
            self.end()
        return result


class FakePrompts:
    def __init__(self, ops: list[tuple[Any, ...]]) -> None:
        self.ops = ops
        self.failing: set[str] = set()  # texts/urls that raise MediaError

    async def tts(self, text: str, voice: str | None, language: str | None) -> Path:
        self.ops.append(("tts", text, voice, language))
        if text in self.failing:
            raise MediaError("tts_failed", f"cannot speak {text!r}")
        return Path(f"/tts/{text}.wav")

    async def audio(self, url: str) -> Path:
        self.ops.append(("audio", url))
        if url in self.failing:
            raise MediaError("media_fetch_failed", f"cannot fetch {url}")
        return Path("/audio") / (url.rsplit("/", 1)[-1] or "index.wav")


class FakeApp:
    """Replies by URL; a value may be a callable (for endless redirects and the like)."""

    def __init__(self, ops: list[tuple[Any, ...]]) -> None:
        self.ops = ops
        self.routes: dict[str, Any] = {}

    async def fetch(
        self, url: str, method: str, extra: Mapping[str, str] | None = None
    ) -> FetchedDocument:
        self.ops.append(("fetch", url, method, dict(extra or {})))
        if url not in self.routes:
            raise VoiceAppError("callback_http_status", f"404 from {url}")
        body = self.routes[url]
        return FetchedDocument(body() if callable(body) else body, url)


class FakeEvents:
    def __init__(self, ops: list[tuple[Any, ...]]) -> None:
        self.ops = ops

    async def recording_ready(
        self, recording_id: str, path: Path, duration_s: float, fmt: str
    ) -> str:
        self.ops.append(("recording_ready", recording_id, path, duration_s, fmt))
        return f"https://rec.example/{recording_id}"


class Fake:
    """One fake call: `fake.ctx` for the interpreter, the parts and `ops` for assertions."""

    def __init__(self, tmp: Path, *, answered: bool = False) -> None:
        self.ops: list[tuple[Any, ...]] = []
        self.leg = FakeLeg(self.ops, answered=answered)
        self.prompts = FakePrompts(self.ops)
        self.app = FakeApp(self.ops)
        self.events = FakeEvents(self.ops)
        self.ctx = CallContext(
            leg=self.leg,
            prompts=self.prompts,
            app=self.app,
            events=self.events,
            voice_callback_url=CALLBACK_URL,
            recordings_dir=tmp,
            default_digit_timeout_s=0.05,
        )

    def kinds(self, *names: str) -> list[tuple[Any, ...]]:
        return [op for op in self.ops if op[0] in names]

    def said(self) -> list[str]:
        """Texts whose prompt started playing, in order."""
        return [op[1].removesuffix(".wav") for op in self.ops if op[0] == "play"]


def doc(*actions: dict[str, Any], url: str = FIRST_URL) -> FetchedDocument:
    return FetchedDocument({"actions": list(actions)}, url)


def say(text: str, **params: Any) -> dict[str, Any]:
    return {"say": {"text": text, **params}}
