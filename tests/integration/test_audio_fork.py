"""AudioFork on real pjsua2 calls: a phone farm (its own pjsua2 process) calls the test
process's endpoint (`phone`), which answers and forks the call. The farm's phone sends a steady
tone and records what it receives: what the fork hands to Python is checked frame by frame,
what the fork plays is checked on the farm's recording (tone, order, gaps, time to silence)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from media.call import SipCall
from media.fork import AudioFork
from tests import tones
from tests.integration.tonephones import PhoneFarm, phone_farm  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

FAR_HZ = 697  # what the farm's phone sends
A_HZ, B_HZ, C_HZ, P_HZ = 1209, 1477, 941, 1336
UNEVEN = (1, 333, 1000, 77, 2501, 160, 999, 41, 640)  # byte sizes, cycled


@pytest.fixture
async def answered(phone, phone_farm, tmp_path) -> AsyncIterator[tuple[PhoneFarm, str, SipCall]]:  # noqa: F811
    farm: PhoneFarm = await phone_farm(tone=FAR_HZ)
    got: asyncio.Queue[SipCall] = asyncio.Queue()
    phone.on_incoming = lambda call, invite: got.put_nowait(call)
    call: SipCall | None = None
    try:
        cid = await farm.call(f"sip:fork@{phone.host_port}", FAR_HZ)
        call = await asyncio.wait_for(got.get(), 5)
        await call.answer()
        await farm.wait(cid, "media")
        yield farm, cid, call
    finally:
        phone.on_incoming = None
        if call is not None:
            await call.hangup()


class Sink:
    """on_audio: every frame with its arrival time (asyncio thread)."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, bytes]] = []

    def __call__(self, pcm: bytes) -> None:
        self.frames.append((time.monotonic(), pcm))

    def between(self, t0: float, t1: float) -> list[bytes]:
        return [p for t, p in self.frames if t0 <= t < t1]


def pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()


def samples(frames: list[bytes], channels: int = 1) -> np.ndarray:
    x = np.frombuffer(b"".join(frames), dtype="<i2").astype(np.float64) / 32768
    return x.reshape(-1, channels) if channels > 1 else x


def chunks(data: bytes, sizes: tuple[int, ...] = UNEVEN) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos:pos + n])
        pos, i = pos + n, i + 1
    return out


async def feed_ahead(fork: AudioFork, parts: list[bytes], ahead_s: float = 0.12) -> None:
    """Play `parts` in order, kept `ahead_s` ahead of real time (like a TTS server streaming
    a little faster than it plays)."""
    bps = fork.clock_rate * 2
    fed, t0 = 0, time.monotonic()
    for part in parts:
        while fed / bps > time.monotonic() - t0 + ahead_s:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert fork.play(part)
        fed += len(part)


def envelope(x: np.ndarray, rate: int, block_s: float = 0.0025) -> np.ndarray:
    n = int(rate * block_s)
    m = len(x) // n
    return np.sqrt(np.mean(x[:m * n].reshape(m, n) ** 2, axis=1))


def sound_spans(x: np.ndarray, rate: int, block_s: float = 0.0025, rel: float = 0.1
                ) -> tuple[float, float, np.ndarray]:
    """(start s, end s, envelope) of the sound in a recording that is silent around it."""
    env = envelope(x, rate, block_s)
    loud = np.flatnonzero(env > rel * np.max(env))
    assert len(loud), "no sound at all"
    return loud[0] * block_s, (loud[-1] + 1) * block_s, env


async def ended_recording(farm: PhoneFarm, cid: str, call: SipCall) -> tuple[np.ndarray, int]:
    """The far end's whole recording: hung up once what it still buffers has played out (its
    jitter buffer holds the last frames sent; a BYE right away would cut them)."""
    await asyncio.sleep(0.3)
    await call.hangup()
    await farm.wait(cid, "disconnected")
    return farm.recording(cid)


async def test_inbound_frames_pacing_tone_and_dtmf(phone, answered):
    farm, cid, call = answered
    sink = Sink()
    fork = AudioFork(call, "inbound", sink)
    assert (fork.clock_rate, fork.channels, fork.frame_bytes) == (8000, 1, 320)
    digits: list[tuple[str, int]] = []

    def boom(_d: str, _ms: int) -> None:
        raise RuntimeError("a listener that fails")

    call.dtmf_listeners[:] = [boom, lambda d, ms: digits.append((d, ms))]
    fork.start()
    try:
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        window = sink.between(t0, t0 + 1.0)
        assert 47 <= len(window) <= 53, len(window)
        assert {len(p) for p in window} == {320}
        x = samples(window)
        assert tones.heard(x, 8000) == {FAR_HZ}, tones.levels(x, 8000)
        gaps = np.diff([t for t, _ in sink.frames[5:]])
        assert np.median(gaps) == pytest.approx(0.020, abs=0.003) and gaps.max() < 0.1
        await farm.send_dtmf(cid, "5")
        for _ in range(100):
            if digits:
                break
            await asyncio.sleep(0.02)
        assert digits and digits[0][0] == "5", digits
        assert 0 <= digits[0][1] < 60_000
        assert await call.next_digit(1.0) == "5"  # the digit buffer still got it
        s = fork.stats()
        assert s.errors == 0 and s.frames_sent >= 60 and s.frames_played == 0
    finally:
        fork.close()
        call.dtmf_listeners.clear()
    n = len(sink.frames)
    fork.close()  # idempotent
    await asyncio.sleep(0.1)
    assert len(sink.frames) == n  # nothing after close
    print("dtmf", digits)


async def test_play_uneven_chunks_in_order_without_gaps(phone, answered):
    farm, cid, call = answered
    fork = AudioFork(call, "inbound", lambda _p: None)
    fork.start()
    # The far end's jitter buffer may drop a frame of the call's very first packets: start
    # the audio checked for gaps once it has settled.
    await asyncio.sleep(0.3)
    rate = fork.clock_rate
    # One phase-continuous signal: 0.5 s of A, then 0.5 s of B.
    t = np.arange(rate) / rate
    freq = np.where(t < 0.5, A_HZ, B_HZ)
    phase = 2 * np.pi * np.cumsum(freq) / rate
    data = pcm(0.5 * np.sin(phase))
    done: list[bool] = []
    await feed_ahead(fork, chunks(data))
    fork.cue(done.append)
    while not done:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    s = fork.stats()
    fork.close()
    x, r = await ended_recording(farm, cid, call)
    start, end, env = sound_spans(x, r)
    assert done == [True]
    assert s.frames_played == 50 and s.underruns == 0 and s.errors == 0, s
    print(f"heard {end - start:.3f} s from {start:.3f}")
    assert end - start == pytest.approx(1.0, abs=0.03), (start, end)
    assert tones.heard(x, r, [A_HZ, B_HZ], start + 0.05, start + 0.45) == {A_HZ}
    assert tones.heard(x, r, [A_HZ, B_HZ], start + 0.55, start + 0.95) == {B_HZ}
    a_on = tones.onset(x, r, A_HZ, after_s=start - 0.05)
    b_on = tones.onset(x, r, B_HZ, after_s=start + 0.05)  # past A's switch-on transient
    assert a_on is not None and b_on is not None and b_on - a_on == pytest.approx(0.5, abs=0.03)
    # No gap at any chunk or frame boundary: every 2.5 ms block of the tone is loud.
    body = env[int((start + 0.01) / 0.0025):int((end - 0.01) / 0.0025)]
    assert body.min() > 0.5 * np.median(body), (body.min(), np.median(body))


async def test_kill_goes_quiet_at_once_and_drops_cues(phone, answered):
    """Queued: 25 frames of tone, one silent frame (a marker the recording shows), 2.5 s more
    tone. A cue timestamps the marker frame's departure; kill() comes 150 ms after it, with
    more than 2 s still queued. On the far end's recording, the sound after the marker lasts
    as long as the fork played it, plus the time kill() took to silence it: measured close to
    the kill, so the far end's jitter buffer (which may drop a frame now and then) barely
    enters the figure."""
    farm, cid, call = answered
    fork = AudioFork(call, "inbound", lambda _p: None)
    fork.start()
    rate, fb = fork.clock_rate, fork.frame_bytes
    tone = pcm(tones.sine(C_HZ, 3.0, rate))
    marker: list[float] = []
    cues: list[bool] = []
    fork.play(tone[:25 * fb] + bytes(fb))
    fork.cue(lambda ok: marker.append(time.monotonic()))  # the silent frame has left
    fork.play(tone[26 * fb:151 * fb])
    fork.cue(cues.append)
    while not marker:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.15)
    queued = fork.stats().queued_frames
    t_kill = time.monotonic()
    fork.kill()
    after: list[bool] = []
    fork.cue(after.append)  # nothing queued now: True, soon
    assert fork.play(tone[:10]) is True  # a remainder...
    fork.kill()  # ...killed too
    await asyncio.sleep(0.4)
    s = fork.stats()
    fork.close()
    x, r = await ended_recording(farm, cid, call)
    start, end, env = sound_spans(x, r)
    assert marker and cues == [False] and after == [True], (marker, cues, after)
    assert queued >= 100 and s.killed_frames >= queued, (queued, s)  # > 2 s queued
    # The marker: the one 20 ms hole in the sound, 25 frames in.
    block = 0.0025
    quiet = env < 0.1 * np.max(env)
    i0 = int((start + 0.4) / block)
    holes = np.flatnonzero(quiet[i0:int(end / block)])
    assert len(holes), "the marker frame is not in the recording"
    resumed = (i0 + holes[-1] + 1) * block  # the sound after the hole starts here
    assert 0.01 <= (holes[-1] - holes[0] + 1) * block <= 0.03  # one frame's hole
    played_s = t_kill - (marker[0] + 0.02)  # from the first tone frame after the marker
    kill_ms = ((end - resumed) - played_s) * 1000
    print(f"kill -> silence {kill_ms:.1f} ms (played {played_s:.3f} s after the marker, "
          f"heard {end - resumed:.3f} s)")
    assert -10 <= kill_ms <= 60, kill_ms
    tail = env[int((end + 0.01) / block):int((end + 0.3) / block)]
    assert len(tail) and tail.max() < 0.05 * np.max(env)  # and quiet stays quiet


async def test_cue_reports_after_the_queued_audio(phone, answered):
    _farm, _cid, call = answered
    fork = AudioFork(call, "inbound", lambda _p: None)
    fork.start()
    got: list[tuple[bool, float]] = []

    def at(ok: bool) -> None:
        got.append((ok, time.monotonic()))

    fork.cue(at)  # nothing queued: soon
    await asyncio.sleep(0.05)
    assert got and got[0][0] is True
    t0 = time.monotonic()
    assert fork.play(pcm(tones.sine(A_HZ, 0.6, fork.clock_rate)) + b"\x00" * 100)
    fork.cue(at)
    while len(got) < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    dt = got[1][1] - t0
    print(f"cue after 0.6125 s queued: {dt * 1000:.1f} ms")
    assert got[1][0] is True and 0.60 <= dt <= 0.68, dt  # 31 frames (the last one padded)
    assert fork.stats().frames_played == 31
    # Refused above max_queued_s.
    small = AudioFork(call, "inbound", lambda _p: None, max_queued_s=0.1)
    assert small.play(bytes(small.frame_bytes * 5)) and not small.play(bytes(small.frame_bytes))
    small.close()
    fork.close()
    assert not fork.play(b"\x00\x00")
    late: list[bool] = []
    fork.cue(late.append)
    await asyncio.sleep(0.02)
    assert late == [False]


async def test_both_tracks_caller_left_gateway_right(phone, answered):
    _farm, _cid, call = answered
    sink = Sink()
    fork = AudioFork(call, "both", sink)
    assert fork.channels == 2 and fork.frame_bytes == 640
    fork.start()
    fork.play(pcm(tones.sine(A_HZ, 1.2, fork.clock_rate)))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await asyncio.sleep(0.8)
    window = sink.between(t0, t0 + 0.8)
    fork.close()
    assert {len(p) for p in window} == {640} and 37 <= len(window) <= 43, len(window)
    x = samples(window, 2)
    freqs = [FAR_HZ, A_HZ]
    assert tones.heard(x[:, 0], 8000, freqs) == {FAR_HZ}, tones.levels(x[:, 0], 8000, freqs)
    assert tones.heard(x[:, 1], 8000, freqs) == {A_HZ}, tones.levels(x[:, 1], 8000, freqs)


async def test_outbound_track_carries_prompts_and_fork_playback(phone, answered,
                                                              tmp_path: Path):
    _farm, _cid, call = answered
    sink = Sink()
    fork = AudioFork(call, "outbound", sink)
    fork.start()
    wav = tmp_path / "prompt.wav"
    tones.write_wav(wav, tones.sine(P_HZ, 0.6, 8000), 8000)
    t_prompt = time.monotonic()
    assert await call.play(wav)
    t_fork = time.monotonic()
    fork.play(pcm(tones.sine(A_HZ, 0.5, fork.clock_rate)))
    await asyncio.sleep(0.7)
    t_end = time.monotonic()
    fork.close()
    freqs = [FAR_HZ, P_HZ, A_HZ]
    x1 = samples(sink.between(t_prompt + 0.1, t_fork - 0.05))
    x2 = samples(sink.between(t_fork + 0.1, t_fork + 0.45))
    assert tones.heard(x1, 8000, freqs) == {P_HZ}, tones.levels(x1, 8000, freqs)
    assert tones.heard(x2, 8000, freqs) == {A_HZ}, tones.levels(x2, 8000, freqs)
    window = sink.between(t_prompt + 0.1, t_end - 0.05)
    assert {len(p) for p in window} == {320}
    n = (t_end - t_prompt - 0.15) * 50
    assert abs(len(window) - n) <= 3, (len(window), n)
    # The prompt's player left the tap when it ended, and the tap is gone with the fork.
    assert call._outbound_taps == [] and call._players == []


async def test_jitter_rule_remainder_underrun_and_cues_tick_by_tick(phone):
    """The playback queue driven by hand, one bridge request at a time (an unstarted fork:
    no port is wired, so the clock never calls it; the test does)."""
    import pjsua2 as pj

    from media.ports import pcm_of

    stand_in = SimpleNamespace(endpoint=SimpleNamespace(cfg=SimpleNamespace(clock_rate=8000)),
                               loop=asyncio.get_running_loop(), pj_id=0)
    fork = AudioFork(stand_in, "inbound", lambda _p: None, jitter_ms=40)  # type: ignore[arg-type]
    fb = fork.frame_bytes

    def tick() -> bytes | None:
        f = pj.MediaFrame()
        fork._on_play_request(f)
        return pcm_of(f.buf) if f.type == pj.PJMEDIA_FRAME_TYPE_AUDIO else None

    def frame(n: int) -> bytes:
        return bytes([n]) * fb

    # One frame alone waits jitter_ms; a second frame starts the spurt at once.
    assert fork.play(frame(1))
    assert tick() is None and tick() is None
    assert fork.play(frame(2))
    assert tick() == frame(1) and tick() == frame(2)
    assert tick() is None  # ran dry: the spurt ends
    # Audio again within UNDERRUN_FRAMES ticks: an underrun. From now on a spurt starts with
    # one more frame of cushion: 3 frames, or its first waited 40 + 20 ms.
    assert fork.play(frame(3))
    assert fork.stats().underruns == 1
    assert tick() is None
    await asyncio.sleep(0.045)
    assert tick() is None
    await asyncio.sleep(0.02)
    assert tick() == frame(3)
    # A remainder waits for more, then completes a frame; alone, it is padded once dry.
    fork.play(frame(4) + b"\x05" * 10)
    fork.play(b"\x05" * (fb - 10) + b"\x06" * 7)
    cues: list[bool] = []
    fork.cue(cues.append)  # after frame 4, frame 5 and the padded 6
    assert tick() == frame(4) and tick() == frame(5)
    assert fork.stats().queued_frames == 1 and cues == []
    assert tick() == b"\x06" * 7 + bytes(fb - 7)
    await asyncio.sleep(0.01)
    assert cues == [True]
    assert tick() is None
    # kill: everything queued and the remainder go; the cue after them answers False.
    fork.play(frame(7) * 3 + b"\x08")
    fork.cue(cues.append)
    fork.kill()
    assert tick() is None and fork.stats().queued_frames == 0
    await asyncio.sleep(0.01)
    assert cues == [True, False]
    s = fork.stats()
    assert (s.frames_played, s.killed_frames, s.errors) == (6, 4, 0), s
    fork.close()
