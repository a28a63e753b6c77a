"""TTS engine protocol plus the shared pieces engines and the prompt store use: a single-flight
map (concurrent requests for one key share one piece of work) and an on-disk WAV cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from media.audio import write_wav_atomic

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

CACHE_FORMAT = 1  # bump to invalidate every cached file after a format change


class TtsEngine(Protocol):
    @property
    def name(self) -> str:
        """Stable engine id; part of the cache key."""

    async def synthesize(
        self, text: str, voice: str | None, language: str | None, rate: int
    ) -> bytes | Path:
        """Speak `text`: 16-bit PCM mono bytes at `rate`, or a Path to such a WAV that the engine
        keeps (e.g. its own cache). Raises `PromptError("tts_failed")`."""


class SingleFlight(Generic[K, T]):
    """At most one running task per key; concurrent callers await the same result.

    The work runs as its own task, so a caller being cancelled (e.g. the caller hung up) does
    not abort a download or synthesis that other calls are waiting for.
    """

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[T]] = {}

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(work())
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: with no waiter left asyncio would log it

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def cache_key(*parts: str | int | None) -> str:
    """sha256 over the JSON of `parts` (unambiguous, unlike plain concatenation)."""
    blob = json.dumps([CACHE_FORMAT, *parts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class TtsCache:
    """`<directory>/<key>.wav` files written atomically; each key rendered once at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._flight: SingleFlight[str, Path] = SingleFlight()

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.wav"

    async def get(self, key: str, rate: int, render: Callable[[], Awaitable[bytes | Path]]) -> Path:
        """The cached WAV for `key`, calling `render` on a miss.

        `render` returns 16-bit PCM bytes at `rate` (stored here) or a Path it owns (returned
        as is, not stored).
        """
        path = self.path_for(key)
        if touch_if_exists(path):
            return path

        async def work() -> Path:
            if touch_if_exists(path):  # another flight finished between our check and now
                return path
            out = await render()
            if isinstance(out, Path):
                return out
            await asyncio.to_thread(write_wav_atomic, path, out, rate)
            return path

        return await self._flight.run(key, work)

    async def aclose(self) -> None:
        await self._flight.aclose()


def touch_if_exists(path: Path) -> bool:
    """True if `path` exists; bumps its mtime so size-bounded pruning evicts least recently used."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:
        return path.exists()
    return True
