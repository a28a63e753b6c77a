"""Who heard whom, measured on audio: tone levels of a recording by Goertzel (single-bin DFT).

Each test phone sends one steady tone from TEST_TONES (single tones, never DTMF pairs) and
records what it receives; a test asks `hears(samples, rate, freq, start_s, end_s)` per tone.

The level of a frequency is measured over Hann-windowed blocks of `WINDOW_S` and reported in
dBFS of a sine's amplitude (a full-scale sine is 0 dBFS); over a span, the median block (a
tone present for most of the span counts; a click does not). Measured here: a pjmedia tone at
its default volume arrives through PCMU at about -9 dBFS; absent tones, with the other test
tones and G.711 noise present, sit below -60 dBFS. `HEARD_DBFS` (-30) is far from both.
"""

from __future__ import annotations

import wave
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

TEST_TONES = (697, 770, 852, 941, 1209, 1336, 1477, 1633)
WINDOW_S = 0.1  # 10 Hz bins: the test tones are >= 73 Hz apart
HEARD_DBFS = -30.0
FLOOR_DBFS = -120.0

Samples = npt.NDArray[np.float64]


def read_wav(path: str | Path) -> tuple[Samples, int]:
    """Mono samples in [-1, 1) and the rate of a 16-bit PCM WAV. A recording still being
    written (its header's sizes not final) is read up to what is on disk."""
    data = Path(path).read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a WAV file")
    rate, channels, bits = 8000, 1, 16
    pos = 12
    pcm = b""
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if cid == b"fmt ":
            channels = int.from_bytes(data[body + 2:body + 4], "little")
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            bits = int.from_bytes(data[body + 14:body + 16], "little")
        elif cid == b"data":
            end = body + size if 0 < size <= len(data) - body else len(data)
            pcm = data[body:end]
            break
        pos = body + size + (size & 1)
    if bits != 16:
        raise ValueError(f"{path}: {bits}-bit samples, want 16")
    pcm = pcm[:len(pcm) // (2 * channels) * 2 * channels]
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels)[:, 0]
    return x, rate


def write_wav(path: str | Path, samples: Samples, rate: int) -> None:
    pcm = (np.clip(samples, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


def sine(freq: float, seconds: float, rate: int = 8000, amp: float = 0.5) -> Samples:
    t = np.arange(int(seconds * rate)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def block_levels(samples: Samples, rate: int, freq: float,
                 window_s: float = WINDOW_S) -> Samples:
    """dBFS of `freq` in each consecutive block of `window_s`."""
    n = int(rate * window_s)
    blocks = len(samples) // n
    if blocks == 0:
        return np.array([], dtype=np.float64)
    x = np.asarray(samples[:blocks * n], dtype=np.float64).reshape(blocks, n)
    w = np.hanning(n)
    k = np.exp(-2j * np.pi * freq * np.arange(n) / rate) * w
    amp = 2 * np.abs(x @ k) / w.sum()
    with np.errstate(divide="ignore"):
        db = 20 * np.log10(amp)
    return np.maximum(db, FLOOR_DBFS)


def _span(samples: Samples, rate: int, start_s: float, end_s: float | None) -> Samples:
    a = max(0, int(start_s * rate))
    b = len(samples) if end_s is None else min(len(samples), int(end_s * rate))
    return samples[a:b]


def levels(samples: Samples, rate: int, freqs: Iterable[float] = TEST_TONES,
           start_s: float = 0.0, end_s: float | None = None) -> dict[float, float]:
    """freq -> median block level (dBFS) between start_s and end_s (seconds into samples)."""
    part = _span(samples, rate, start_s, end_s)
    out: dict[float, float] = {}
    for f in freqs:
        lv = block_levels(part, rate, f)
        out[f] = float(np.median(lv)) if len(lv) else FLOOR_DBFS
    return out


def hears(samples: Samples, rate: int, freq: float, start_s: float = 0.0,
          end_s: float | None = None, threshold_dbfs: float = HEARD_DBFS) -> bool:
    """Whether `freq` is present (median block level above the threshold) in the span."""
    return levels(samples, rate, [freq], start_s, end_s)[freq] > threshold_dbfs


def heard(samples: Samples, rate: int, freqs: Iterable[float] = TEST_TONES,
          start_s: float = 0.0, end_s: float | None = None,
          threshold_dbfs: float = HEARD_DBFS) -> set[float]:
    """The set of `freqs` present in the span (for `assert heard(...) == {697}`)."""
    lv = levels(samples, rate, freqs, start_s, end_s)
    return {f for f, db in lv.items() if db > threshold_dbfs}


def onset(samples: Samples, rate: int, freq: float, after_s: float = 0.0,
          threshold_dbfs: float = HEARD_DBFS, step_s: float = 0.005) -> float | None:
    """Seconds into `samples` where `freq` first rises above the threshold after `after_s`
    (blocks of 20 ms slid by `step_s`): the arrival of a burst, for latency measurements."""
    n = int(rate * 0.02)
    step = max(1, int(rate * step_s))
    start = max(0, int(after_s * rate))
    w = np.hanning(n)
    k = np.exp(-2j * np.pi * freq * np.arange(n) / rate) * w
    for i in range(start, len(samples) - n, step):
        amp = 2 * abs(np.dot(samples[i:i + n], k)) / w.sum()
        if amp > 0 and 20 * np.log10(amp) > threshold_dbfs:
            return (i + n / 2) / rate
    return None
