"""media.resample: streaming and one-shot int16 resampling keep the tone, the length and the
continuity whatever the chunking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from media.resample import Resampler, resample_clip

RATES = (8000, 16000, 24000, 48000, 22050, 44100)
PAIRS = [(a, b) for a, b in itertools.product(RATES, RATES) if a != b]
AMP = 12000
# Odd sizes, some below one sample, some splitting a stereo pair; cycled over the input.
CHUNKS = (1, 7, 333, 160, 3, 479, 1001, 2, 641)


def tone(freq: float, rate: int, seconds: float, amp: float = AMP, phase: float = 0.0
         ) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return np.round(amp * np.sin(2 * np.pi * freq * t + phase)).astype("<i2")


def chunked(data: bytes, sizes: tuple[int, ...] = CHUNKS) -> list[bytes]:
    out, pos = [], 0
    for n in itertools.cycle(sizes):
        if pos >= len(data):
            return out
        out.append(data[pos:pos + n])
        pos += n
    return out


def peak_hz(x: np.ndarray, rate: int) -> float:
    x = x.astype(np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spec))])


def max_jump(x: np.ndarray) -> float:
    return float(np.max(np.abs(np.diff(x.astype(np.float64)))))


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_streamed_tone_keeps_frequency_continuity_and_length(src: int, dst: int) -> None:
    seconds = 1.0
    x = tone(1000, src, seconds)
    r = Resampler(src, dst)
    parts = [r.process(c) for c in chunked(x.tobytes())]
    body = b"".join(parts)
    assert len(body) % 2 == 0
    y = np.frombuffer(body, dtype="<i2")
    want = len(x) * dst / src
    # Without flush only the filter's delay is held back (QQ: a few samples, < 2 ms).
    assert want - 0.002 * dst - 1 <= len(y) <= want + 1, (len(y), want)
    full = np.frombuffer(body + r.flush(), dtype="<i2")
    assert abs(len(full) - want) <= 1, (len(full), want)
    # The tone's frequency, within the FFT's bin (1 Hz over 1 s) and a little.
    assert abs(peak_hz(full, dst) - 1000) <= 2
    # No click at any chunk boundary: the steepest step of a sine of amplitude A at rate R is
    # A * 2 pi f / R; allow 15 % of ripple and one LSB of rounding (skip the filter's start).
    skip = int(0.005 * dst)
    bound = AMP * 2 * np.pi * 1000 / dst * 1.15 + 2
    assert max_jump(full[skip:-skip]) <= bound, (max_jump(full[skip:-skip]), bound)
    # And the level held (no dropouts): RMS of a sine is A / sqrt(2).
    rms = float(np.sqrt(np.mean(full[skip:-skip].astype(np.float64) ** 2)))
    assert 0.9 * AMP / np.sqrt(2) < rms < 1.1 * AMP / np.sqrt(2)


@pytest.mark.parametrize(("src", "dst"), [(8000, 16000), (48000, 8000), (22050, 24000)])
def test_stereo_channels_stay_apart_and_pairs_split_across_chunks(src: int, dst: int) -> None:
    left, right = tone(1000, src, 0.5), tone(400, src, 0.5, amp=6000)
    inter = np.stack([left, right], axis=1).astype("<i2").tobytes()
    r = Resampler(src, dst, channels=2)
    out = b"".join(r.process(c) for c in chunked(inter)) + r.flush()
    assert len(out) % 4 == 0
    y = np.frombuffer(out, dtype="<i2").reshape(-1, 2)
    assert abs(len(y) - len(left) * dst / src) <= 1
    assert abs(peak_hz(y[:, 0], dst) - 1000) <= 4
    assert abs(peak_hz(y[:, 1], dst) - 400) <= 4
    skip = int(0.005 * dst)
    assert max_jump(y[skip:-skip, 0]) <= AMP * 2 * np.pi * 1000 / dst * 1.15 + 2
    assert max_jump(y[skip:-skip, 1]) <= 6000 * 2 * np.pi * 400 / dst * 1.15 + 2


def test_identity_when_rates_equal_keeps_bytes_and_carries_odd_byte() -> None:
    r = Resampler(8000, 8000)
    assert r.identity
    data = bytes(range(200))
    out = b"".join(r.process(c) for c in chunked(data))
    assert out == data
    assert r.process(b"\x01") == b"" and r.process(b"\x02\x03") == b"\x01\x02"
    s = Resampler(16000, 16000, channels=2)
    assert s.process(b"abc") == b"" and s.process(b"defgh") == b"abcdefgh"


def test_streaming_latency_is_tiny() -> None:
    """QQ gives out (nearly) all of a 20 ms chunk at once: no 60-100 ms hold-back."""
    for src, dst in ((8000, 16000), (16000, 8000), (8000, 24000), (44100, 8000)):
        r = Resampler(src, dst)
        got = len(r.process(tone(1000, src, 0.02).tobytes())) // 2
        assert got >= 0.02 * dst - 0.002 * dst, (src, dst, got)


def test_clip_hq_keeps_tone_and_length() -> None:
    x = tone(1000, 22050, 0.7)
    for dst in RATES:
        y = np.frombuffer(resample_clip(x.tobytes() + b"\x00", 22050, dst), dtype="<i2")
        assert abs(len(y) - len(x) * dst / 22050) <= 1
        if dst != 22050:
            assert abs(peak_hz(y, dst) - 1000) <= 3
            skip = int(0.01 * dst)
            assert max_jump(y[skip:-skip]) <= AMP * 2 * np.pi * 1000 / dst * 1.15 + 2
    assert resample_clip(b"", 8000, 16000) == b""
    assert resample_clip(b"\x01\x02\x03", 8000, 8000) == b"\x01\x02"


@pytest.mark.parametrize("bad", [0, -8000, 8000.5])
def test_bad_rates_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        Resampler(bad, 8000)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        resample_clip(b"", 8000, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Resampler(8000, 16000, channels=3)
