"""Sample-rate conversion of 16-bit little-endian PCM: streaming (`Resampler`) and one-shot
(`resample_clip`), both on libsoxr (the `soxr` package).

A stream's audio arrives and leaves in chunks (20 ms frames to a WebSocket, whatever sizes a
server sends back): `Resampler.process` keeps the filter's state across chunks, so a chunk
boundary adds no click, and the samples come out in order and at the right count (minus the
filter's small delay, which the next chunk pushes out). It uses soxr's "QQ" (quick) quality:
measured with this soxr, LQ/MQ/HQ streams hold back 60-100 ms of audio per chunk before the
first output (a latency no voice agent wants); QQ holds back ~4 samples and costs ~6-10 µs
per 20 ms chunk. Whole clips (a `playAudio` message) have no latency constraint:
`resample_clip` uses soxr's "HQ" on the whole clip at once.

Bytes in, bytes out: mono or 2-channel interleaved int16 LE. A chunk that ends inside a sample
(an odd byte, or half a stereo pair) keeps the tail for the next chunk. Equal rates: identity
(only that alignment). Any positive integer rate either way (8000, 16000, 22050, 24000, 44100,
48000, ...). These run on the asyncio thread (never in a pjsua2 frame callback).
"""

from __future__ import annotations

import numpy as np
import soxr

__all__ = ["Resampler", "resample_clip"]

STREAM_QUALITY = "QQ"
CLIP_QUALITY = "HQ"


def _check(rate: int, what: str) -> int:
    r = int(rate)
    if r != rate or r <= 0:
        raise ValueError(f"{what} must be a positive integer rate in Hz, got {rate!r}")
    return r


class Resampler:
    """Streaming int16 resampler: `process(chunk)` per chunk, in order; `flush()` at the end
    of a stream returns what the filter still holds (a few samples)."""

    def __init__(self, src_rate: int, dst_rate: int, channels: int = 1) -> None:
        self.src_rate = _check(src_rate, "src_rate")
        self.dst_rate = _check(dst_rate, "dst_rate")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels!r}")
        self.channels = channels
        self._width = 2 * channels  # bytes per sample frame
        self._tail = b""  # bytes of an incomplete sample frame, waiting for the next chunk
        self._stream: soxr.ResampleStream | None = None
        if self.src_rate != self.dst_rate:
            self._stream = soxr.ResampleStream(
                self.src_rate, self.dst_rate, channels, dtype="int16", quality=STREAM_QUALITY)

    @property
    def identity(self) -> bool:
        return self._stream is None

    def process(self, pcm: bytes) -> bytes:
        """Resample the next chunk (any length); may return b"" for a tiny chunk."""
        if self._tail:
            pcm = self._tail + pcm
            self._tail = b""
        cut = len(pcm) - len(pcm) % self._width
        if cut != len(pcm):
            self._tail = bytes(pcm[cut:])
            pcm = pcm[:cut]
        if self._stream is None:
            return bytes(pcm)
        if not pcm:
            return b""
        x = np.frombuffer(pcm, dtype="<i2")
        if self.channels == 2:
            x = x.reshape(-1, 2)
        y = self._stream.resample_chunk(x)
        out: bytes = y.astype("<i2", copy=False).tobytes()
        return out

    def flush(self) -> bytes:
        """The end of the stream: the samples the filter still holds (the tail of an
        incomplete sample frame is dropped). The resampler starts over afterwards."""
        self._tail = b""
        if self._stream is None:
            return b""
        shape = (0, 2) if self.channels == 2 else (0,)
        y = self._stream.resample_chunk(np.zeros(shape, dtype="<i2"), last=True)
        self._stream = soxr.ResampleStream(
            self.src_rate, self.dst_rate, self.channels, dtype="int16", quality=STREAM_QUALITY)
        out: bytes = y.astype("<i2", copy=False).tobytes()
        return out


def resample_clip(pcm: bytes, src_rate: int, dst_rate: int, channels: int = 1) -> bytes:
    """A whole clip of int16 LE PCM from `src_rate` to `dst_rate` (soxr HQ, one shot). An
    incomplete trailing sample frame is dropped."""
    src, dst = _check(src_rate, "src_rate"), _check(dst_rate, "dst_rate")
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels!r}")
    width = 2 * channels
    pcm = pcm[:len(pcm) - len(pcm) % width]
    if src == dst or not pcm:
        return bytes(pcm)
    x = np.frombuffer(pcm, dtype="<i2")
    if channels == 2:
        x = x.reshape(-1, 2)
    y = soxr.resample(x, src, dst, quality=CLIP_QUALITY)
    return np.asarray(y, dtype="<i2").tobytes()
