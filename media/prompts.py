"""`PromptStore`: turns `say` text and `play` URLs into 16-bit PCM mono WAVs at the bridge rate.

Implements the shape of `dsl.context.Prompts`, raising `media.errors.PromptError` (the gateway
maps it to `MediaError`).

Cache layout under `cache_dir`: `tts/<sha256>.wav` (engines returning bytes; engines returning
a Path keep their own cache) and `audio/<sha256(url)>.wav`. Audio entries live for the
response's `Cache-Control: max-age` (minus `Age`), else `default_ttl_s`; a stale entry with an
ETag/Last-Modified is revalidated with a conditional GET. Fetch/decode failures are remembered
for `negative_ttl_s`. The URL index is in memory: after a restart URLs are fetched again.

Size bound (optional, off by default): with `max_cache_bytes` set, a prune (in a thread)
deletes the least recently used `*.wav` files (by mtime; hits bump it) in `cache_dir/audio`
and `cache_dir/tts` (nothing else) down to 90 % of the bound, once ~5 % of the bound was
written or a minute passed. Give `EspeakTts` `cache_dir / "tts"` so its files count too.
Files used in the last `prune_grace_s` are never deleted: a path just handed out may be about
to play.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from yarl import URL

from media.audio import decode, resample, write_wav_atomic
from media.errors import PromptError, PromptErrorCode
from media.tts.base import SingleFlight, TtsCache, TtsEngine, cache_key, touch_if_exists

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_PRUNE_INTERVAL_S = 60.0


@dataclass
class _Entry:
    path: Path
    expires: float  # on the store's clock
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True)
class _Failure:
    code: PromptErrorCode
    message: str
    expires: float


class PromptStore:
    def __init__(
        self,
        cache_dir: Path,
        clock_rate: int,
        tts: TtsEngine,
        session: aiohttp.ClientSession,
        check_url: Callable[[str], Awaitable[None]],
        max_bytes: int = 20 * MiB,
        fetch_timeout_s: float = 10.0,
        *,
        default_ttl_s: float = 300.0,
        max_ttl_s: float = 86400.0,
        negative_ttl_s: float = 30.0,
        max_redirects: int = 5,
        max_duration_s: float = 600.0,
        max_decoded_bytes: int = 64 * MiB,
        max_cache_bytes: int | None = None,
        prune_grace_s: float = 120.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dir = Path(cache_dir)
        self._audio_dir = self._dir / "audio"
        self._rate = clock_rate
        self._tts = tts
        self._session = session
        self._check_url = check_url
        self._max_bytes = max_bytes
        self._fetch_timeout_s = fetch_timeout_s
        self._default_ttl_s = default_ttl_s
        self._max_ttl_s = max_ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_redirects = max_redirects
        self._max_duration_s = max_duration_s
        self._max_decoded_bytes = max_decoded_bytes
        self._max_cache_bytes = max_cache_bytes
        self._prune_grace_s = prune_grace_s
        self._max_entries = max_entries
        self._clock = clock
        self._tts_cache = TtsCache(self._dir / "tts")
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._failures: dict[str, _Failure] = {}
        self._flight: SingleFlight[str, Path] = SingleFlight()
        self._written_since_prune = 0
        self._last_prune = -math.inf
        self._pruning = False
        self._audio_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(self._dir)

    @property
    def clock_rate(self) -> int:
        return self._rate

    async def tts(self, text: str, voice: str | None, language: str | None) -> Path:
        key = cache_key(self._tts.name, voice, language, text, self._rate)

        async def render() -> bytes | Path:
            try:
                return await self._tts.synthesize(text, voice, language, self._rate)
            except PromptError:
                raise
            except Exception as exc:  # an engine bug must not escape as a random exception
                raise PromptError("tts_failed", f"{type(exc).__name__}: {exc}") from exc

        try:
            path = await self._tts_cache.get(key, self._rate, render)
        except OSError as exc:
            raise PromptError("tts_failed", f"cannot store synthesized audio: {exc}") from exc
        await self._note_written(0)
        return path

    async def audio(self, url: str) -> Path:
        """Fetch (SSRF-checked, cached) and convert an audio URL to a WAV at the bridge rate."""
        await self._check(url)
        now = self._clock()
        failure = self._failures.get(url)
        if failure is not None:
            if failure.expires > now:
                raise PromptError(failure.code, failure.message)
            del self._failures[url]
        entry = self._entries.get(url)
        if entry is not None and entry.expires > now and touch_if_exists(entry.path):
            self._entries.move_to_end(url)
            return entry.path
        return await self._flight.run(url, lambda: self._refresh(url))

    async def aclose(self) -> None:
        """Cancel in-flight fetches and syntheses (the session belongs to the caller)."""
        await self._flight.aclose()
        await self._tts_cache.aclose()

    # -- fetching -------------------------------------------------------------------------

    async def _check(self, url: str) -> None:
        try:
            await self._check_url(url)
        except Exception as exc:
            raise PromptError("url_forbidden", f"{url}: {exc}") from exc

    async def _refresh(self, url: str) -> Path:
        try:
            path = await self._fetch_and_store(url)
        except PromptError as exc:
            if exc.code != "url_forbidden":  # policy checks are cheap and may change
                self._remember_failure(url, exc)
            raise
        self._failures.pop(url, None)
        return path

    async def _fetch_and_store(self, url: str, *, revalidate: bool = True) -> Path:
        old = self._entries.get(url) if revalidate else None
        if old is not None and not old.path.exists():
            old = None  # pruned: validators are useless without the file
        conditional: dict[str, str] = {}
        if old is not None:
            if old.etag:
                conditional["If-None-Match"] = old.etag
            if old.last_modified:
                conditional["If-Modified-Since"] = old.last_modified
        body, headers = await self._download(url, conditional)
        expires = self._clock() + self._ttl(headers)
        etag = headers.get("ETag")
        last_modified = headers.get("Last-Modified")
        if body is None:  # 304 Not Modified (only possible when `old` gave validators)
            if old is None:
                raise PromptError("media_fetch_failed", f"{url}: unexpected 304")
            path = old.path
            if not touch_if_exists(path):  # pruned while we asked: fetch it whole
                return await self._fetch_and_store(url, revalidate=False)
            etag = etag or old.etag
            last_modified = last_modified or old.last_modified
            size = 0
        else:
            path = self._audio_dir / f"{hashlib.sha256(url.encode()).hexdigest()}.wav"
            try:
                size = await asyncio.to_thread(self._convert, body, path)
            except OSError as exc:
                raise PromptError("media_fetch_failed", f"cannot store audio: {exc}") from exc
        self._entries[url] = _Entry(path, expires, etag, last_modified)
        self._entries.move_to_end(url)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)  # the file stays until pruned by size
        await self._note_written(size)
        return path

    async def _download(
        self, url: str, conditional: Mapping[str, str]
    ) -> tuple[bytes | None, Mapping[str, str]]:
        """GET with a size cap and an overall deadline; redirects are followed by hand so each
        hop passes `check_url` (aiohttp's own following would bypass the SSRF check)."""
        current = url
        try:
            async with asyncio.timeout(self._fetch_timeout_s):
                for _ in range(self._max_redirects + 1):
                    async with self._session.get(
                        current, headers=conditional, allow_redirects=False
                    ) as resp:
                        if resp.status in _REDIRECTS and "Location" in resp.headers:
                            current = str(resp.url.join(URL(resp.headers["Location"])))
                            await self._check(current)
                            continue
                        if resp.status == 304 and conditional:
                            return None, resp.headers
                        if not 200 <= resp.status < 300:
                            raise PromptError("media_fetch_failed", f"{url}: HTTP {resp.status}")
                        length = resp.content_length
                        if length is not None and length > self._max_bytes:
                            raise PromptError("media_fetch_failed", self._too_big(url))
                        body = bytearray()
                        async for chunk in resp.content.iter_chunked(_CHUNK):
                            body += chunk
                            if len(body) > self._max_bytes:
                                raise PromptError("media_fetch_failed", self._too_big(url))
                        return bytes(body), resp.headers
        except TimeoutError:
            raise PromptError(
                "media_fetch_failed", f"{url}: timed out after {self._fetch_timeout_s:g} s"
            ) from None
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            raise PromptError("media_fetch_failed", f"{url}: {type(exc).__name__}: {exc}") from exc
        raise PromptError("media_fetch_failed", f"{url}: more than {self._max_redirects} redirects")

    def _too_big(self, url: str) -> str:
        return f"{url}: body larger than {self._max_bytes} bytes"

    def _convert(self, body: bytes, path: Path) -> int:
        x, rate = decode(
            body, max_duration_s=self._max_duration_s, max_decoded_bytes=self._max_decoded_bytes
        )
        y = resample(x, rate, self._rate)
        write_wav_atomic(path, y, self._rate)
        return 2 * y.size

    def _ttl(self, headers: Mapping[str, str]) -> float:
        directives: dict[str, str | None] = {}
        for part in headers.get("Cache-Control", "").split(","):
            name, _, value = part.strip().partition("=")
            if name:
                directives[name.lower()] = value.strip().strip('"') if value else None
        if "no-store" in directives or "no-cache" in directives:
            return 0.0
        max_age = directives.get("max-age")
        if max_age is None:
            return self._default_ttl_s
        try:
            ttl = float(int(max_age))
        except ValueError:
            return self._default_ttl_s
        with contextlib.suppress(ValueError):
            ttl -= int(headers.get("Age", "0"))
        return min(max(ttl, 0.0), self._max_ttl_s)

    def _remember_failure(self, url: str, exc: PromptError) -> None:
        now = self._clock()
        if len(self._failures) > 1000:
            self._failures = {u: f for u, f in self._failures.items() if f.expires > now}
        self._failures[url] = _Failure(exc.code, exc.message, now + self._negative_ttl_s)

    # -- size bound ---------------------------------------------------------------------

    async def _note_written(self, size: int) -> None:
        """Prune after ~5 % of the bound was written here, or at most once a minute (engines
        with their own cache under `cache_dir` write without telling us). The scan runs in a
        thread; concurrent callers skip it rather than queue."""
        if self._max_cache_bytes is None:
            return
        self._written_since_prune += size
        now = self._clock()
        if self._pruning or (
            self._written_since_prune <= self._max_cache_bytes // 20
            and now - self._last_prune < _PRUNE_INTERVAL_S
        ):
            return
        self._pruning = True
        self._written_since_prune = 0
        self._last_prune = now
        try:
            await asyncio.to_thread(self.prune)
        except OSError as exc:
            log.warning("prompt cache: prune failed: %s", exc)
        finally:
            self._pruning = False

    def prune(self) -> int:
        """Delete least recently used cached WAVs until the cache is under 90 % of
        `max_cache_bytes`; returns the number of files deleted. No-op without a bound."""
        if self._max_cache_bytes is None:
            return 0
        files: list[tuple[float, int, Path]] = []
        for sub in (self._audio_dir, self._tts_cache.directory):  # never anything else
            if not sub.is_dir():
                continue
            with os.scandir(sub) as it:
                for e in it:
                    if e.name.endswith(".wav") and not e.name.startswith("."):
                        with contextlib.suppress(OSError):
                            st = e.stat()
                            files.append((st.st_mtime, st.st_size, Path(e.path)))
        total = sum(size for _, size, _ in files)
        if total <= self._max_cache_bytes:
            return 0
        target = self._max_cache_bytes * 9 // 10
        grace_start = time.time() - self._prune_grace_s
        removed = 0
        for mtime, size, path in sorted(files):
            if total <= target or mtime > grace_start:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
            total -= size
        if removed:
            log.info("prompt cache: evicted %d files, %d bytes remain", removed, total)
        return removed


def _remove_stale_temp_files(root: Path, older_than_s: float = 3600.0) -> None:
    """Temp files left by a crash mid-write (`.<name>.*.tmp`); never visible as cache entries."""
    cutoff = time.time() - older_than_s
    for tmp in [*root.glob("audio/.*.tmp"), *root.glob("tts/.*.tmp")]:
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
