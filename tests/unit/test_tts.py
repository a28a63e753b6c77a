from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest

from media import audio
from media.errors import PromptError
from media.tts import EspeakTts, SingleFlight

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng missing")


@pytest.mark.parametrize(
    ("voice", "language", "expected"),
    [
        (None, None, "en"),  # default en-KE
        (None, "en-KE", "en"),
        (None, "en-GB", "en"),
        (None, "en", "en"),
        (None, "en-US", "en-us"),
        (None, "EN_us", "en-us"),
        (None, "en-AU", "en"),  # other English regions: generic English
        (None, "sw", "sw"),
        ("woman", "sw-KE", "sw+f3"),
        ("man", "sw-TZ", "sw+m3"),
        ("alice", "en-US", "en-us+f2"),
        ("WOMAN", "en-KE", "en+f3"),
    ],
)
def test_voice_mapping(tmp_path: Path, voice, language, expected) -> None:
    assert EspeakTts(tmp_path).resolve_voice(voice, language) == expected


def test_unknown_language_or_voice_falls_back_with_one_warning(tmp_path, caplog) -> None:
    tts = EspeakTts(tmp_path, default_language="sw-KE", default_voice="woman")
    with caplog.at_level(logging.WARNING, logger="media.tts.espeak"):
        assert tts.resolve_voice(None, "fr-FR") == "sw+f3"
        assert tts.resolve_voice(None, "fr-FR") == "sw+f3"
        assert tts.resolve_voice("Polly.Joanna", "en-US") == "en-us+f3"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "fr-FR" in warnings[0] and "Polly.Joanna" in warnings[1]


def test_bad_defaults_fail_at_construction(tmp_path) -> None:
    with pytest.raises(ValueError):
        EspeakTts(tmp_path, default_language="xx")
    with pytest.raises(ValueError):
        EspeakTts(tmp_path, default_voice="robot")


@needs_espeak
@pytest.mark.parametrize(
    ("language", "text"),
    [
        ("en-KE", "Hello, thank you for calling. Press one for sales."),
        ("sw-KE", "Habari, asante kwa kupiga simu. Bonyeza moja kwa mauzo."),
    ],
)
async def test_synthesis_is_audible_8k(tmp_path, language, text) -> None:
    tts = EspeakTts(tmp_path)
    path = await tts.synthesize(text, "woman", language, 8000)
    x, rate = audio.read_wav(path)
    assert rate == 8000
    assert audio.rms_dbfs(x) > -35
    # ~10 words at espeak's default 175 wpm: a few seconds of speech.
    assert 1.5 < audio.active_duration(x, rate) < 8
    assert path.parent == tmp_path


@needs_espeak
async def test_cache_hit_spawns_nothing(tmp_path) -> None:
    tts = EspeakTts(tmp_path)
    first = await tts.synthesize("Welcome", None, "en-US", 8000)
    assert tts.runs == 1
    again = await tts.synthesize("Welcome", None, "en-US", 8000)
    assert again == first and tts.runs == 1
    # A fresh engine on the same directory (e.g. after a restart) hits the disk cache.
    assert await EspeakTts(tmp_path).synthesize("Welcome", None, "en-US", 8000) == first
    # Different rate or voice: a different prompt.
    wide = await tts.synthesize("Welcome", None, "en-US", 16000)
    assert wide != first and audio.read_wav(wide)[1] == 16000
    await tts.synthesize("Welcome", "man", "en-US", 8000)
    assert tts.runs == 3


@needs_espeak
async def test_concurrent_requests_share_one_run(tmp_path) -> None:
    tts = EspeakTts(tmp_path)
    paths = await asyncio.gather(*(tts.synthesize("Karibu", None, "sw", 8000) for _ in range(8)))
    assert len(set(paths)) == 1 and tts.runs == 1


@needs_espeak
async def test_text_is_never_an_option(tmp_path) -> None:
    tts = EspeakTts(tmp_path)
    evil = tmp_path / "evil.wav"
    path = await tts.synthesize(f"--help -w {evil} $(touch {evil})", None, "en", 8000)
    assert not evil.exists()
    assert audio.active_duration(*audio.read_wav(path)) > 0.5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp cleaned


@needs_espeak
async def test_punctuation_only_gives_short_playable_file(tmp_path) -> None:
    x, rate = audio.read_wav(await EspeakTts(tmp_path).synthesize("...", None, "en", 8000))
    assert x.size >= 0.1 * rate


async def test_rejects_empty_and_too_long_text(tmp_path) -> None:
    tts = EspeakTts(tmp_path, max_chars=50)
    for text in ["", "  \n\t", "x" * 51]:
        with pytest.raises(PromptError) as ei:
            await tts.synthesize(text, None, None, 8000)
        assert ei.value.code == "tts_failed"
    assert tts.runs == 0


async def test_missing_binary_is_tts_failed(tmp_path) -> None:
    tts = EspeakTts(tmp_path, executable=str(tmp_path / "no-such-espeak"))
    with pytest.raises(PromptError) as ei:
        await tts.synthesize("hello", None, None, 8000)
    assert ei.value.code == "tts_failed"


async def test_failing_binary_is_tts_failed(tmp_path) -> None:
    fake = tmp_path / "fake-espeak"
    fake.write_text("#!/bin/sh\necho 'voice not found' >&2\nexit 3\n")
    fake.chmod(0o755)
    tts = EspeakTts(tmp_path / "cache", executable=str(fake))
    with pytest.raises(PromptError, match="exited 3: voice not found"):
        await tts.synthesize("hello", None, None, 8000)
    # Failures are not cached: the next call tries again.
    with pytest.raises(PromptError):
        await tts.synthesize("hello", None, None, 8000)
    assert tts.runs == 2


async def test_hung_binary_times_out(tmp_path) -> None:
    fake = tmp_path / "slow-espeak"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    tts = EspeakTts(tmp_path / "cache", executable=str(fake), timeout_s=0.3)
    with pytest.raises(PromptError, match="timed out"):
        await asyncio.wait_for(tts.synthesize("hello", None, None, 8000), 5)


async def test_single_flight_survives_a_cancelled_waiter() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    started = 0

    async def work() -> int:
        nonlocal started
        started += 1
        await asyncio.sleep(0.05)
        return 42

    a = asyncio.create_task(flight.run("k", work))
    b = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0.01)
    a.cancel()
    assert await b == 42 and started == 1
    assert len(flight) == 0
