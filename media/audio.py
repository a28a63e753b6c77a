"""Audio helpers: decode, resample, write, measure. Pure numpy + soundfile.

Everything here is synchronous and CPU/disk bound: async callers run it via `asyncio.to_thread`.
Samples are float32 mono in [-1, 1]. Levels are RMS relative to full scale (a full-scale square
wave is 0 dBFS, a full-scale sine is -3.01 dBFS).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import wave
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from media.errors import PromptError

Samples = NDArray[np.float32]

_READ_BLOCK = 1 << 16
# Sample rates a decoded file may have; anything else is refused (media_decode_failed).
MIN_RATE = 4000
MAX_RATE = 384000


def _as_samples(x: NDArray[np.floating] | Sequence[float]) -> Samples:
    return np.asarray(x, dtype=np.float32).reshape(-1)


def decode(
    data: bytes, *, max_duration_s: float | None = None, max_decoded_bytes: int | None = None
) -> tuple[Samples, int]:
    """Decode WAV/MP3/OGG/FLAC (anything libsndfile reads) to float32 mono at its own rate.

    `max_duration_s` and `max_decoded_bytes` (of float32 mono samples at the file's rate) bound
    what decoding may produce: a few MiB of compressed silence can expand to hours, so callers
    taking untrusted input should set them. Rates outside MIN_RATE..MAX_RATE are refused.
    Raises `PromptError("media_decode_failed")` naming the reason.
    """
    if not data:
        raise PromptError("media_decode_failed", "empty body")
    blocks: list[Samples] = []
    total = 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = int(f.samplerate)
            if not MIN_RATE <= rate <= MAX_RATE:
                raise PromptError(
                    "media_decode_failed",
                    f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz",
                )
            limits: list[tuple[int, str]] = []
            if max_duration_s is not None:
                too_long = f"audio longer than {max_duration_s:g} s"
                limits.append((int(max_duration_s * rate), too_long))
            if max_decoded_bytes is not None:
                limits.append(
                    (max_decoded_bytes // 4, f"decoded audio larger than {max_decoded_bytes} bytes")
                )
            limit, too_long = min(limits) if limits else (None, "")
            if limit is not None and f.frames > limit and f.seekable():
                raise PromptError("media_decode_failed", too_long)  # the header says so
            # Read in blocks and downmix each one so a stereo file never sits in memory twice.
            while True:
                block = f.read(_READ_BLOCK, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                blocks.append(block.mean(axis=1, dtype=np.float32))
                total += block.shape[0]
                if limit is not None and total > limit:
                    raise PromptError("media_decode_failed", too_long)
    except PromptError:
        raise
    except (RuntimeError, ValueError, TypeError, EOFError, OSError) as exc:
        # soundfile.LibsndfileError is a RuntimeError ("Format not recognised", ...).
        raise PromptError("media_decode_failed", f"cannot decode audio: {exc}") from exc
    if total == 0:
        raise PromptError("media_decode_failed", "no audio frames")
    x = np.concatenate(blocks)
    np.nan_to_num(x, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(x, -1.0, 1.0, out=x)
    return x, rate


# Windowed-sinc design: 24 zero crossings each side and a Kaiser window (beta 8) give ~80 dB
# stopband; the cutoff sits at 90 % of the lower Nyquist so the transition band ends near it.
_ZERO_CROSSINGS = 24
_ROLLOFF = 0.90
_KAISER_BETA = 8.0
_OUT_BLOCK = 4096
# Bounds on the polyphase design, whatever the rates: the bank has up rows of about
# 53 * max(1, down / up) taps, so both terms stay small and the ratio down/up stays near 1.
_MAX_TERM = 1000
_MAX_STAGE_RATIO = 4
_MAX_FRAME_ELEMENTS = 1 << 18  # samples gathered per output block (frames array)


@lru_cache(maxsize=16)
def _filter_bank(up: int, down: int) -> tuple[NDArray[np.float32], int]:
    """Polyphase bank: row p holds the taps for output instants at input offset p/up."""
    fc = 0.5 * min(1.0, up / down) * _ROLLOFF  # cutoff, cycles per input sample
    half = _ZERO_CROSSINGS / (2.0 * fc)  # filter half-width, in input samples
    k = math.ceil(half)
    frac = np.arange(up, dtype=np.float64)[:, None] / up
    tau = frac + (k - 1 - np.arange(2 * k, dtype=np.float64)[None, :])
    t = tau / half
    window = np.where(
        np.abs(t) <= 1.0,
        np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - t * t, 0.0, None))) / np.i0(_KAISER_BETA),
        0.0,
    )
    h = 2.0 * fc * np.sinc(2.0 * fc * tau) * window
    h /= h.sum(axis=1, keepdims=True)  # unity DC gain for every phase
    return h.astype(np.float32), k


def _stage_ratio(ratio: Fraction) -> Fraction:
    """`ratio` (dst/src), or the nearest ratio whose terms are at most _MAX_TERM: 44100 -> 8000
    (80/441) stays exact; 48001 -> 8000 (8000/48001) becomes 1/6 (a 2e-5 rate error, far below
    what an ear or a codec notices) instead of an 8000-phase filter bank."""
    if max(ratio.numerator, ratio.denominator) <= _MAX_TERM:
        return ratio
    if ratio >= 1:
        return 1 / (1 / ratio).limit_denominator(_MAX_TERM)
    return ratio.limit_denominator(_MAX_TERM)


def _polyphase(x: Samples, up: int, down: int) -> Samples:
    bank, k = _filter_bank(up, down)
    # Output n sits at input time n*down/up; its taps cover x[base-k+1 .. base+k].
    xp = np.concatenate([np.zeros(k, np.float32), x, np.zeros(k + 1, np.float32)])
    n_out = (x.size * up + down - 1) // down
    taps = np.arange(2 * k, dtype=np.int64)[None, :]
    out = np.empty(n_out, dtype=np.float32)
    block = max(16, min(_OUT_BLOCK, _MAX_FRAME_ELEMENTS // (2 * k)))
    for start in range(0, n_out, block):
        n = np.arange(start, min(start + block, n_out), dtype=np.int64)
        base, phase = np.divmod(n * down, up)
        frames = xp[base[:, None] + 1 + taps]
        out[start : start + n.size] = np.einsum("ij,ij->i", frames, bank[phase])
    return out


def resample(x: NDArray[np.floating], src_rate: int, dst_rate: int) -> Samples:
    """Polyphase resampling with a Kaiser-windowed sinc (anti-alias when downsampling).

    Cost is linear in the input and memory bounded whatever the rates: a large downsampling
    factor first decimates by an integer (each stage at most _MAX_STAGE_RATIO short of the
    target), and a ratio with huge terms (a 48001 Hz file) is rounded to a near one with small
    terms (`_stage_ratio`). Output length is about len(x) * dst / src (exact for exact ratios).
    """
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError("sample rates must be positive")
    x = _as_samples(x)
    if src_rate == dst_rate or x.size == 0:
        return x.copy()
    ratio = Fraction(dst_rate, src_rate)
    while ratio * _MAX_STAGE_RATIO < 1:  # more than 4x down: an integer decimation first
        m = int(1 / (2 * ratio))
        x = _polyphase(x, 1, m)
        ratio *= m
    ratio = _stage_ratio(ratio)
    if ratio == 1:
        return x.copy()
    return _polyphase(x, ratio.numerator, ratio.denominator)


def to_pcm16(x: NDArray[np.floating]) -> bytes:
    """Float samples → 16-bit little-endian PCM bytes (clipped)."""
    y = np.clip(_as_samples(x), -1.0, 1.0) * 32767.0
    return np.round(y).astype("<i2").tobytes()


def from_pcm16(data: bytes) -> Samples:
    """16-bit little-endian PCM bytes → float samples."""
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)


def write_wav_atomic(
    path: Path, data: NDArray[np.floating] | bytes | bytearray | memoryview, rate: int
) -> None:
    """Write a 16-bit PCM mono WAV so that `path` is either absent/old or complete.

    `data` is float samples or 16-bit PCM bytes. The file is written to a temp file in the same
    directory, fsynced, then `os.replace`d over `path`: readers never see a partial file, and a
    reader that already opened the old file keeps reading the old one.
    """
    pcm = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else to_pcm16(data)
    if len(pcm) % 2:
        raise ValueError("16-bit PCM data must have an even number of bytes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            os.fchmod(raw.fileno(), 0o644)  # mkstemp makes 0600; other readers may need it
            with wave.open(raw, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(pcm)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_wav(path: Path) -> tuple[Samples, int]:
    """Read any libsndfile-readable file as float32 mono and its rate."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1, dtype=np.float32), int(rate)


def rms_dbfs(x: NDArray[np.floating]) -> float:
    """RMS level in dBFS (full-scale square = 0); -inf for silence or no samples."""
    x = _as_samples(x)
    if x.size == 0:
        return -math.inf
    ms = float(np.mean(np.square(x, dtype=np.float64)))
    return 10.0 * math.log10(ms) if ms > 0.0 else -math.inf


def active_duration(
    x: NDArray[np.floating], rate: int, threshold_dbfs: float = -45.0, frame_ms: float = 20.0
) -> float:
    """Seconds of audio in frames whose RMS reaches `threshold_dbfs` ("what the caller heard")."""
    x = _as_samples(x)
    n = max(1, round(rate * frame_ms / 1000.0))
    full = x.size // n
    threshold_ms = 10.0 ** (threshold_dbfs / 10.0)
    frames = x[: full * n].reshape(full, n).astype(np.float64)
    active = int(np.count_nonzero(np.mean(frames * frames, axis=1) >= threshold_ms)) * n
    tail = x[full * n :]
    if tail.size and rms_dbfs(tail) >= threshold_dbfs:
        active += tail.size
    return active / rate


def duration(x: NDArray[np.floating], rate: int) -> float:
    return _as_samples(x).size / rate


def peak_frequency(x: NDArray[np.floating], rate: int) -> float:
    """Frequency (Hz) of the strongest spectral peak, interpolated between FFT bins."""
    x = _as_samples(x).astype(np.float64)
    if x.size < 4:
        return 0.0
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    i = int(np.argmax(spectrum[1:])) + 1  # skip DC
    offset = 0.0
    if 0 < i < spectrum.size - 1:
        a, b, c = np.log(spectrum[i - 1 : i + 2] + 1e-20)
        denom = a - 2.0 * b + c
        offset = 0.5 * (a - c) / denom if denom != 0.0 else 0.0
    return float((i + offset) * rate / x.size)


def tone(
    freqs: float | Sequence[float],
    duration_s: float,
    rate: int,
    level_dbfs: float = -10.0,
    ramp_ms: float = 0.0,
) -> Samples:
    """Sum of equal-amplitude sines whose total RMS is `level_dbfs`.

    `ramp_ms` applies raised-cosine fades at both ends (avoids clicks). Raises ValueError if the
    requested level would clip.
    """
    fs = [float(freqs)] if isinstance(freqs, int | float) else [float(f) for f in freqs]
    if not fs:
        raise ValueError("at least one frequency")
    n = round(duration_s * rate)
    amplitude = 10.0 ** (level_dbfs / 20.0) / math.sqrt(len(fs) / 2.0)
    if amplitude * len(fs) > 1.0:
        raise ValueError(f"{level_dbfs} dBFS over {len(fs)} sines would clip")
    t = np.arange(n, dtype=np.float64) / rate
    y = sum(np.sin(2.0 * np.pi * f * t) for f in fs) * amplitude
    y = np.asarray(y, dtype=np.float64)
    r = min(n // 2, round(rate * ramp_ms / 1000.0))
    if r > 0:
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
        y[:r] *= fade
        y[n - r :] *= fade[::-1]
    return y.astype(np.float32)


def silence(duration_s: float, rate: int) -> Samples:
    return np.zeros(round(duration_s * rate), dtype=np.float32)


def beep(
    rate: int, duration_s: float = 0.2, freq: float = 1000.0, level_dbfs: float = -12.0
) -> Samples:
    """The short 1 kHz beep played before `record`."""
    return tone(freq, duration_s, rate, level_dbfs, ramp_ms=5.0)
