"""A `play` URL is untrusted: odd sample rates, huge rates and long files cost bounded memory.

Peaks are measured with tracemalloc in a spawned child: in the test process a session pjsua2
endpoint's clock thread runs Python port callbacks, and CPython 3.11's tracemalloc.stop() races
allocating threads (gh-128679) and crashed the run with SIGSEGV."""

from __future__ import annotations

import io
import multiprocessing
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

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


def decode_and_resample(data: bytes, dst: int) -> tuple[int, np.ndarray]:
    """Peak traced bytes of decoding `data` and resampling it to `dst`, and the result."""
    tracemalloc.start()
    try:
        x, r = decode(data, max_duration_s=600)
        y = resample(x, r, dst)
        return tracemalloc.get_traced_memory()[1], y
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def child() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.mark.parametrize("rate", [48001, 192001, 384000, 44100, 11025, 4000])
@pytest.mark.parametrize("dst", [8000, 16000])
def test_odd_and_high_rates_resample_in_bounded_memory(child: ProcessPoolExecutor, rate: int,
                                                       dst: int) -> None:
    peak, y = child.submit(decode_and_resample, wav(rate, 0.1), dst).result(timeout=60)
    # Before: 250 MB (48001 Hz), 1 GB (192001), 2 GB (384001) for a 0.1 s file.
    assert peak < 8 * MiB, f"{rate} Hz -> {dst}: {peak / MiB:.1f} MiB"
    assert isinstance(y, np.ndarray)
    assert abs(y.size - 0.1 * dst) <= 2
    assert abs(peak_frequency(y[len(y) // 4 : -len(y) // 4], dst) - 1000.0) < 15


def test_long_high_rate_file_memory_is_linear(child: ProcessPoolExecutor) -> None:
    # 5 s at 192 kHz (a 1.9 MB body): what decoding and resampling hold beyond the samples.
    peak, _ = child.submit(decode_and_resample, wav(192000, 5.0), 8000).result(timeout=60)
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
