"""Generated tones as conference ports: ringback, a hold tone, a beep, a test tone.

Each is an object owning its `pj.ToneGenerator` (not limited to 32 per process like players
and recorders) with `audio_media` to wire into a MixGraph and `close()`. Tones stay clear of
the test tones (697-1633 Hz, tests/tones.py) so a test can tell them apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import pjsua2 as pj

# (freq1, freq2, on_ms, off_ms); freq2 0 = a single frequency.
Segment = tuple[int, int, int, int]

# Kenya / UK ringback: 400+450 Hz, 0.4 s on, 0.2 s off, 0.4 s on, 2 s off.
RINGBACK: tuple[Segment, ...] = ((400, 450, 400, 200), (400, 450, 400, 2000))
# A gentle hold pattern: two soft notes (A4, C#5), then 3.5 s of quiet.
HOLD: tuple[Segment, ...] = ((440, 0, 300, 150), (554, 0, 300, 3500))
BEEP_HZ = 1000  # between the test tones 941 and 1209
BEEP: tuple[Segment, ...] = ((BEEP_HZ, 0, 200, 0),)
HOLD_VOLUME = 6000  # quieter than the generator's default (pjmedia's PJMEDIA_TONEGEN_VOLUME)


class Tone:
    """A ToneGenerator playing `segments` (looped or once) at `volume` (0: pjmedia's default
    amplitude). Start it with `play()`; connect `audio_media` to whoever should hear it."""

    def __init__(self, clock_rate: int, segments: Sequence[Segment], *, loop: bool = True,
                 volume: int = 0, start: bool = True) -> None:
        self._gen: pj.ToneGenerator | None = pj.ToneGenerator()
        self._gen.createToneGenerator(clock_rate, 1)
        self.segments = tuple(segments)
        self.loop = loop
        self.volume = volume
        if start:
            self.play()

    @property
    def audio_media(self) -> pj.AudioMedia:
        if self._gen is None:
            raise RuntimeError("tone closed")
        return self._gen

    def play(self) -> None:
        """(Re)start the pattern from its beginning."""
        if self._gen is None:
            raise RuntimeError("tone closed")
        vec = pj.ToneDescVector()
        for f1, f2, on, off in self.segments:
            d = pj.ToneDesc()
            d.freq1, d.freq2, d.on_msec, d.off_msec = f1, f2, on, off
            d.volume = self.volume
            vec.append(d)
        self._gen.play(vec, self.loop)

    def busy(self) -> bool:
        """Still playing (a tone played once has finished when False)."""
        return self._gen is not None and bool(self._gen.isBusy())

    def __del__(self) -> None:
        # Dropped after libDestroy: leak the generator rather than let it call into the library.
        gen = self.__dict__.get("_gen")
        if gen is None:
            return
        try:
            running = pj.Endpoint.instance().libGetState() == pj.PJSUA_STATE_RUNNING
        except Exception:
            running = False
        if not running:
            with contextlib.suppress(Exception):
                gen.thisown = False

    def close(self) -> None:
        """Stop it and drop the generator (its port leaves the bridge). Stop its edges first."""
        gen, self._gen = self._gen, None
        if gen is not None:
            with contextlib.suppress(pj.Error):
                gen.stop()


def ringback(clock_rate: int) -> Tone:
    return Tone(clock_rate, RINGBACK)


def hold_tone(clock_rate: int) -> Tone:
    return Tone(clock_rate, HOLD, volume=HOLD_VOLUME)


def beep(clock_rate: int) -> Tone:
    """One short beep (played once; `play()` again for another)."""
    return Tone(clock_rate, BEEP, loop=False)


def steady(clock_rate: int, hz: int, volume: int = 0) -> Tone:
    """A continuous single tone (a test phone's voice)."""
    return Tone(clock_rate, ((hz, 0, 1000, 0),), volume=volume)
