"""eSpeak NG text-to-speech (local, offline, robotic but intelligible; Swahili included).

Voice selection from the SDK's BCP-47 `language` and `voice` name:

=========================  =====================  ============================================
language                   espeak-ng voice        note
=========================  =====================  ============================================
en-US                      en-us                  American English
en, en-GB, en-KE, en-*     en                     British English; espeak-ng has no Kenyan
                                                  English voice and Kenyan English is
                                                  non-rhotic with British norms, so `en`
                                                  (en-gb) is the closest
sw, sw-KE, sw-TZ, sw-*     sw                     Swahili
anything else              the default language   logged once at WARNING
=========================  =====================  ============================================

`voice`: `man` → variant `m3`, `woman` → `f3`, `alice` → `f2`; None → espeak's default (male);
an unknown name → the default voice, logged once at WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import unicodedata
from collections.abc import Mapping
from pathlib import Path

from media.audio import read_wav, resample, to_pcm16
from media.errors import PromptError
from media.tts.base import TtsCache, cache_key

log = logging.getLogger(__name__)

ESPEAK_LANGUAGES: Mapping[str, str] = {
    "en": "en",
    "en-gb": "en",
    "en-ke": "en",
    "en-us": "en-us",
    "sw": "sw",
    "sw-ke": "sw",
    "sw-tz": "sw",
}
# Other regions of a known language fall back to its generic voice.
_PRIMARY_FALLBACK: Mapping[str, str] = {"en": "en", "sw": "sw"}

ESPEAK_VARIANTS: Mapping[str, str] = {"man": "m3", "woman": "f3", "alice": "f2"}

DEFAULT_LANGUAGE = "en-KE"
MAX_CHARS = 4000
_MIN_OUTPUT_S = 0.1  # text that speaks as nothing (e.g. "...") still yields a playable file


class EspeakTts:
    """`TtsEngine` backed by the `espeak-ng` binary; results cached as WAVs under `cache_dir`.

    `synthesize` returns the cached Path. The same (voice, text, rate) is synthesized once;
    concurrent identical requests share one espeak-ng run.
    """

    name = "espeak-ng"

    def __init__(
        self,
        cache_dir: Path,
        *,
        executable: str = "espeak-ng",
        default_language: str = DEFAULT_LANGUAGE,
        default_voice: str | None = None,
        speed_wpm: int | None = None,
        max_chars: int = MAX_CHARS,
        timeout_s: float = 30.0,
        max_concurrency: int = 4,
    ) -> None:
        self._cache = TtsCache(Path(cache_dir))
        self._executable = executable
        default = _espeak_language(_normalize(default_language))
        if default is None:  # fail at startup, not on the first call
            raise ValueError(f"default_language {default_language!r} has no espeak-ng voice")
        self._default_language = default_language
        self._default_espeak_language = default
        self._default_variant: str | None = None
        if default_voice:
            if default_voice.lower() not in ESPEAK_VARIANTS:
                raise ValueError(f"default_voice {default_voice!r} is not one of {ESPEAK_VARIANTS}")
            self._default_variant = ESPEAK_VARIANTS[default_voice.lower()]
        self._speed_wpm = speed_wpm
        self._max_chars = max_chars
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_concurrency)  # espeak-ng is CPU-bound
        self._warned: set[str] = set()
        self._runs = 0

    @property
    def runs(self) -> int:
        """How many espeak-ng processes were spawned (cache hits spawn none)."""
        return self._runs

    def resolve_voice(self, voice: str | None, language: str | None) -> str:
        """The espeak-ng `-v` argument for an SDK voice name and BCP-47 language."""
        lang = self._default_espeak_language
        if language:
            found = _espeak_language(_normalize(language))
            if found is None:
                self._warn_once(
                    f"lang:{_normalize(language)}",
                    "no espeak-ng voice for language %r; using %r",
                    language,
                    self._default_language,
                )
            else:
                lang = found
        variant = self._default_variant
        name = (voice or "").strip().lower()
        if name:
            if name in ESPEAK_VARIANTS:
                variant = ESPEAK_VARIANTS[name]
            else:
                self._warn_once(f"voice:{name}", "unknown TTS voice %r; using the default", voice)
        return f"{lang}+{variant}" if variant else lang

    async def synthesize(
        self, text: str, voice: str | None, language: str | None, rate: int
    ) -> Path:
        clean = _clean_text(text)
        if not clean.strip():
            raise PromptError("tts_failed", "empty text")
        if len(clean) > self._max_chars:
            raise PromptError(
                "tts_failed", f"text is {len(clean)} characters, limit {self._max_chars}"
            )
        if rate <= 0:
            raise ValueError("rate must be positive")
        espeak_voice = self.resolve_voice(voice, language)
        key = cache_key(self.name, espeak_voice, self._speed_wpm, clean, rate)
        return await self._cache.get(key, rate, lambda: self._render(clean, espeak_voice, rate))

    async def _render(self, text: str, espeak_voice: str, rate: int) -> bytes:
        async with self._slots:
            self._cache.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                dir=self._cache.directory, prefix=".espeak.", suffix=".tmp"
            )
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                await self._run(text, espeak_voice, tmp)
                return await asyncio.to_thread(_load, tmp, rate)
            finally:
                await asyncio.to_thread(_unlink_quiet, tmp)

    async def _run(self, text: str, espeak_voice: str, out: Path) -> None:
        # No shell; the text goes through stdin so nothing in it can be read as an option.
        args = [self._executable, "-v", espeak_voice, "-b", "1", "-w", str(out)]
        if self._speed_wpm is not None:
            args += ["-s", str(self._speed_wpm)]
        args.append("--stdin")
        self._runs += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise PromptError("tts_failed", f"cannot run {self._executable}: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout_s):
                _, err = await proc.communicate(text.encode("utf-8"))
        except TimeoutError:
            raise PromptError(
                "tts_failed", f"espeak-ng timed out after {self._timeout_s:g} s"
            ) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: don't leave it running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            detail = err.decode("utf-8", "replace").strip()[:300]
            raise PromptError("tts_failed", f"espeak-ng exited {proc.returncode}: {detail}")

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    async def aclose(self) -> None:
        await self._cache.aclose()


def _load(path: Path, rate: int) -> bytes:
    try:
        x, src = read_wav(path)
    except RuntimeError as exc:
        raise PromptError("tts_failed", f"unreadable espeak-ng output: {exc}") from exc
    y = resample(x, src, rate)
    minimum = round(_MIN_OUTPUT_S * rate)
    pcm = to_pcm16(y)
    if y.size < minimum:
        pcm += b"\x00\x00" * (minimum - y.size)
    return pcm


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _espeak_language(tag: str) -> str | None:
    return ESPEAK_LANGUAGES.get(tag) or _PRIMARY_FALLBACK.get(tag.split("-", 1)[0])


def _normalize(tag: str) -> str:
    return tag.strip().replace("_", "-").lower()


def _clean_text(text: str) -> str:
    # Control characters (NUL in particular) confuse espeak-ng; line breaks become spaces.
    out = []
    for ch in unicodedata.normalize("NFC", text):
        if ch in "\r\n\t":
            out.append(" ")
        elif unicodedata.category(ch) != "Cc":
            out.append(ch)
    return "".join(out).strip()
