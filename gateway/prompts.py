"""The DSL's `Prompts` on top of `media.prompts.PromptStore` (media never imports dsl)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dsl.context import MediaError
from media.audio import beep, write_wav_atomic
from media.errors import PromptError
from media.prompts import PromptStore


class GatewayPrompts:
    def __init__(self, store: PromptStore, cache_dir: Path, clock_rate: int) -> None:
        self.store = store
        self._beep_path = cache_dir / f"beep-{clock_rate}.wav"
        self._clock_rate = clock_rate
        self._beep_lock = asyncio.Lock()

    async def tts(self, text: str, voice: str | None, language: str | None) -> Path:
        try:
            return await self.store.tts(text, voice, language)
        except PromptError as e:
            raise MediaError(e.code, e.message) from e

    async def audio(self, url: str) -> Path:
        try:
            return await self.store.audio(url)
        except PromptError as e:
            raise MediaError(e.code, e.message) from e

    async def beep(self) -> Path:
        async with self._beep_lock:
            if not self._beep_path.exists():
                self._beep_path.parent.mkdir(parents=True, exist_ok=True)
                write_wav_atomic(self._beep_path, beep(self._clock_rate), self._clock_rate)
        return self._beep_path
