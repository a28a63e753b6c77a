from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from media import audio
from media.errors import PromptError


def _encode(x: np.ndarray, rate: int, fmt: str, tmp_path: Path) -> bytes:
    """Encode with soundfile; for MP3 fall back to sox when this libsndfile can't write it."""
    try:
        buf = io.BytesIO()
        sf.write(buf, x, rate, format=fmt)
        return buf.getvalue()
    except (sf.LibsndfileError, TypeError, ValueError):
        if fmt != "MP3" or shutil.which("sox") is None:
            raise
    wav, mp3 = tmp_path / "in.wav", tmp_path / "out.mp3"
    sf.write(wav, x, rate)
    if subprocess.run(["sox", str(wav), str(mp3)], capture_output=True).returncode != 0:
        pytest.skip("neither libsndfile nor sox can write MP3 here")
    return mp3.read_bytes()


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_decode_formats_downmixes_to_mono(fmt: str, tmp_path: Path) -> None:
    rate = 16000 if fmt == "MP3" else 22050
    left = audio.tone(440, 1.0, rate, -12)
    stereo = np.stack([left, left], axis=1)
    x, got_rate = audio.decode(_encode(stereo, rate, fmt, tmp_path))
    assert got_rate == rate
    assert x.dtype == np.float32 and x.ndim == 1
    # Lossy codecs add priming/padding samples: allow a little slack on duration.
    assert abs(x.size / rate - 1.0) < 0.1
    assert abs(audio.peak_frequency(x, rate) - 440) < 3
    assert abs(audio.rms_dbfs(x) - -12) < 1.0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"<html>not found</html>" * 20, "cannot decode"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk", "cannot decode"),
    ],
)
def test_decode_garbage(data: bytes, reason: str) -> None:
    with pytest.raises(PromptError) as ei:
        audio.decode(data)
    assert ei.value.code == "media_decode_failed"
    assert reason in ei.value.message


def test_decode_caps_duration() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000 * 5, np.float32), 8000, format="FLAC")
    assert audio.decode(buf.getvalue(), max_duration_s=6)[0].size == 40000
    with pytest.raises(PromptError, match="longer than 2 s"):
        audio.decode(buf.getvalue(), max_duration_s=2)


@pytest.mark.parametrize(
    ("src", "dst", "freq"),
    [
        (22050, 8000, 440),
        (44100, 8000, 1000),
        (48000, 16000, 3000),
        (8000, 16000, 1000),
        (11025, 8000, 600),
        (16000, 8000, 2500),
    ],
)
def test_resample_preserves_frequency_and_duration(src: int, dst: int, freq: float) -> None:
    x = audio.tone(freq, 1.5, src, -10)
    y = audio.resample(x, src, dst)
    assert y.dtype == np.float32
    assert abs(y.size - 1.5 * dst) <= 1
    assert abs(audio.peak_frequency(y, dst) - freq) < 1.0
    edge = dst // 20  # filter warm-up at the ends
    assert abs(audio.rms_dbfs(y[edge:-edge]) - -10) < 0.3


def test_resample_removes_what_would_alias() -> None:
    # 5 kHz cannot exist at 8 kHz; without a lowpass it would fold to 3 kHz.
    y = audio.resample(audio.tone(5000, 1.0, 22050, -6), 22050, 8000)
    assert audio.rms_dbfs(y[400:-400]) < -70


def test_resample_same_rate_and_empty() -> None:
    x = audio.tone(100, 0.1, 8000)
    assert np.array_equal(audio.resample(x, 8000, 8000), x)
    assert audio.resample(np.zeros(0, np.float32), 8000, 16000).size == 0


def test_pcm16_round_trip_and_clipping() -> None:
    pcm = audio.to_pcm16(np.array([0.0, 0.5, -0.5, 2.0, -2.0], np.float32))
    assert np.frombuffer(pcm, "<i2").tolist() == [0, 16384, -16384, 32767, -32767]
    back = audio.from_pcm16(pcm)
    assert abs(back[1] - 0.5) < 1e-3


def test_write_and_read_wav(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "a.wav"
    audio.write_wav_atomic(dest, audio.tone(1000, 0.5, 8000), 8000)
    with wave.open(str(dest)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (
            1,
            2,
            8000,
            4000,
        )
    x, rate = audio.read_wav(dest)
    assert rate == 8000 and abs(audio.peak_frequency(x, rate) - 1000) < 1
    audio.write_wav_atomic(dest, audio.to_pcm16(x[:100]), 16000)  # bytes input
    assert audio.read_wav(dest)[0].size == 100


def test_write_wav_atomic_failure_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "p.wav"
    audio.write_wav_atomic(dest, audio.tone(500, 0.2, 8000), 8000)
    before = dest.read_bytes()

    def half_then_fail(self: wave.Wave_write, data: bytes) -> None:
        self.writeframesraw(bytes(data)[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(wave.Wave_write, "writeframes", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        audio.write_wav_atomic(dest, audio.tone(700, 1.0, 8000), 8000)
    assert dest.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.wav"]  # temp file cleaned up

    with pytest.raises(OSError):
        audio.write_wav_atomic(tmp_path / "new.wav", audio.tone(700, 1.0, 8000), 8000)
    assert not (tmp_path / "new.wav").exists()


def test_write_wav_atomic_readers_never_see_partial(tmp_path: Path) -> None:
    dest = tmp_path / "p.wav"
    versions = [audio.tone(300 + 100 * i, 0.5 + 0.1 * i, 8000) for i in range(4)]
    audio.write_wav_atomic(dest, versions[0], 8000)
    sizes = {v.size for v in versions}
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                with wave.open(str(dest)) as w:
                    n = w.getnframes()
                    assert len(w.readframes(n)) == 2 * n
                    seen.append(n)
            except BaseException as exc:
                errors.append(exc)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(40):
            audio.write_wav_atomic(dest, versions[i % 4], 8000)
    finally:
        stop.set()
        t.join(5)
    assert not errors
    assert seen and set(seen) <= sizes


def test_levels_and_active_duration() -> None:
    rate = 8000
    x = np.concatenate(
        [
            audio.tone(440, 0.5, rate, -20),
            audio.silence(1.0, rate),
            audio.tone(880, 0.3, rate, -30),
            np.full(rate, 10 ** (-60 / 20), np.float32),  # -60 dBFS hiss: below threshold
        ]
    )
    assert abs(audio.active_duration(x, rate) - 0.8) < 0.021
    assert audio.active_duration(x, rate, threshold_dbfs=-25) == pytest.approx(0.5, abs=0.021)
    assert audio.rms_dbfs(audio.tone(440, 1, rate, -20)) == pytest.approx(-20, abs=0.05)
    assert audio.rms_dbfs(audio.silence(1, rate)) == float("-inf")
    assert audio.duration(x, rate) == pytest.approx(2.8)


def test_tone_sum_and_clip_guard() -> None:
    dtmf = audio.tone([697, 1209], 0.2, 8000, -10)
    assert audio.rms_dbfs(dtmf) == pytest.approx(-10, abs=0.1)
    with pytest.raises(ValueError):
        audio.tone([697, 1209], 0.2, 8000, -1)


def test_beep() -> None:
    b = audio.beep(8000)
    assert b.size == 1600
    assert abs(audio.peak_frequency(b, 8000) - 1000) < 2
    assert abs(b[0]) < 1e-3 and abs(b[-1]) < 1e-2  # ramped: no click
    assert audio.active_duration(b, 8000) == pytest.approx(0.2, abs=0.021)
