"""A `play` URL is untrusted: odd sample rates, huge rates and long files cost bounded memory."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from media.audio import decode, peak_frequency, resample, tone
from media.errors import PromptError

MiB = 1 << 20


def wav(rate: int, seconds: float, freq: float = 1000.0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(freq, seconds, rate, -10.0), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def peak_bytes(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = fn()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("rate", [48001, 192001, 384000, 44100, 11025, 4000])
@pytest.mark.parametrize("dst", [8000, 16000])
def test_odd_and_high_rates_resample_in_bounded_memory(rate: int, dst: int) -> None:
    data = wav(rate, 0.1)

    def run() -> np.ndarray:
        x, r = decode(data, max_duration_s=600)
        return resample(x, r, dst)

    peak, y = peak_bytes(run)
    # Before: 250 MB (48001 Hz), 1 GB (192001), 2 GB (384001) for a 0.1 s file.
    assert peak < 8 * MiB, f"{rate} Hz -> {dst}: {peak / MiB:.1f} MiB"
    assert isinstance(y, np.ndarray)
    assert abs(y.size - 0.1 * dst) <= 2
    assert abs(peak_frequency(y[len(y) // 4 : -len(y) // 4], dst) - 1000.0) < 15


def test_long_high_rate_file_memory_is_linear() -> None:
    # 5 s at 192 kHz (a 1.9 MB body): what decoding and resampling hold beyond the samples.
    data = wav(192000, 5.0)
    peak, _ = peak_bytes(lambda: resample(*decode(data), 8000))
    samples = 192000 * 5 * 4
    assert peak < 4 * samples + 2 * MiB, f"{peak / MiB:.1f} MiB for {samples / MiB:.1f} MiB"


@pytest.mark.parametrize("rate", [384001, 1_000_000, 3999, 1])
def test_absurd_rates_refused(rate: int) -> None:
    with pytest.raises(PromptError) as e:
        decode(wav(rate, 0.01) if rate >= 100 else wav(100, 0.01)[:24] + rate.to_bytes(4, "little")
               + wav(100, 0.01)[28:])
    assert e.value.code == "media_decode_failed"
    assert "sample rate" in e.value.message or "decode" in e.value.message


def test_duration_and_size_caps() -> None:
    data = wav(8000, 2.0)
    with pytest.raises(PromptError) as e:
        decode(data, max_duration_s=1.0)
    assert (e.value.code, e.value.message) == ("media_decode_failed", "audio longer than 1 s")
    with pytest.raises(PromptError) as e:
        decode(data, max_decoded_bytes=32000)  # 8000 float32 samples: 1 s
    assert e.value.code == "media_decode_failed" and "larger than 32000 bytes" in e.value.message
    x, rate = decode(data, max_duration_s=2.0, max_decoded_bytes=64000)
    assert (x.size, rate) == (16000, 8000)
