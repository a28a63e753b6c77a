"""An audio fork: a call's audio out to Python every 20 ms, and Python's audio back to the caller.

`AudioFork(call, track, on_audio)` (knows nothing of documents or WebSockets; gateway/streams
puts a WebSocket on each end) owns two pooled conference ports (media/ports.py; taken from the
pool, given back, never deleted at run time):

- the **playback port** P: `P -> caller` always. Its `onFrameRequested` gives the bridge the
  oldest frame of the fork's playback queue (what `play()` was given), or nothing (a NONE
  frame: silence in the mix). For "inbound" and "both" it also listens: `caller -> P`, and its
  `onFrameReceived` gets the caller's audio.
- the **outbound tap** T ("outbound" and "both" only): `P -> T`, and every `SipCall.play`
  player while the fork runs (`SipCall.add_outbound_tap`): T hears what the gateway plays to
  the caller. Bridged dial/room audio and MixGraph tones are NOT in it (a documented limit:
  they are MixGraph edges to the call's port, not players).

The fork's clock is the bridge's: the port that receives the fork's track (P for "inbound" and
"both", T for "outbound") hands exactly ONE frame to asyncio per 20 ms tick with
`loop.call_soon_threadsafe` (the house rule for pjsua2 callbacks), a frame of silence when the
bridge had none, so the pacing downstream is the bridge's steady 20 ms. Frames are mono 16-bit
LE at the bridge's clock rate; "both" is 2-channel interleaved, caller left, gateway right
(the tap's newest frame, silence if none: the right channel may lag the left by one tick, the
order in which the bridge visits the two ports).

Playback. `play(pcm)` (asyncio thread) cuts whole 20 ms frames into a deque behind a
`threading.Lock` (held for the append and the pop only: microseconds, except a long clip's
slicing, ~0.1 µs a frame); a remainder shorter than a frame waits for more and, once the queue
runs dry, is played padded with silence. Jitter rule: a talk spurt starts when 2 frames are
queued or its first frame has waited `jitter_ms`; then it plays a frame per tick until the
queue is empty. The spurt ends there; if new audio arrives within UNDERRUN_FRAMES ticks of that,
the pause was an underrun (a gap inside what the sender meant as one spurt), counted in
`stats().underruns`, and every later spurt starts with one more frame of cushion (and waits
20 ms longer), up to MAX_START_FRAMES: a sender that paces its audio with jitter pays a little
latency instead of gaps; one that bursts, or paces evenly, never pays it. Above
`max_queued_s` queued, `play` refuses the chunk (returns False).
`kill()` drops the queue and the remainder at once under the lock: the next tick gives silence
(the frame the bridge already took, at most one tick, is still sent). `cue(fn)` is answered
`fn(True)` once every frame queued before it has been given to the bridge: the clock thread
only compares two ints per played frame and does one `call_soon_threadsafe` when a cue's
position is reached (no per-frame asyncio hop for cues); `kill()` / `close()` answer pending
cues `fn(False)`. Cue and listener callbacks run on the asyncio thread and their exceptions are
logged, never raised into the fork.

Why the frame callbacks run Python at all, and why this little: the wheel has no C port that
forks audio (upstream's AudioMediaAiPort is 2.17), and a frame must reach the socket within a
tick. What runs per frame on the clock thread is kept to a frame copy with `pcm_of` / `fill`
(~2 µs instead of SWIG's ~145 µs `bytes(frame.buf)`), a deque pop under a lock, and one
`call_soon_threadsafe`: no numpy, no resampling (asyncio does that), no logging. The price is
the GIL: each callback needs it, so the worker calls `tune_gil()` (1 ms switch interval) once
when its first fork starts; a worker holds at most 4 calls (the wheel's limit), so at most 4
forks share a clock thread. Measured by bench/fork_cost.py (2026-12-02, 2-core machine, 8 kHz,
stand-in calls; see its docstring), with 4 forks on one clock (a full worker):
- in the callbacks (perf_counter around them, p50): capture 15-23 µs (the copy, one
  call_soon_threadsafe: its self-pipe write releases the GIL, and the woken event loop often
  takes it for a while: p99 130-280 µs, far inside the 20 ms tick); playback 1 µs per idle
  tick, 19-22 µs per frame played; the "both" tap 10 µs;
- process CPU beyond the bridge (clock thread + asyncio delivery + play()): 133 µs per tick
  for a capture-only fork (0.66 % of a core), 178-218 µs for a bidirectional one (0.9-1.1 %).
  A lone fork costs 430-600 µs per tick (2.1-3 %): most of that is per tick, not per fork
  (an idle asyncio loop woken 50 times a second costs ~1 % of a core here, and the bridge's
  first Python callback of a tick runs cold), so it is shared once a worker holds more forks
  (20 forks: 77-170 µs per fork tick). SWIG's `bytes(frame.buf)` instead of `pcm_of` costs
  ~375-515 µs in the capture callback alone. Batching the asyncio hops of several forks into
  one per tick, or polling them from an asyncio timer, measured no better (same CPU within
  noise), so each frame is its own `call_soon_threadsafe`, as the house rule says.

Everything but the frame callbacks runs on the asyncio thread (the one that created the
endpoint, or one registered with pjsua2). The frame callbacks never raise (errors are counted
in `stats().errors`).
"""

from __future__ import annotations

import array
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pjsua2 as pj

from media.call import CallEnd, SipCall
from media.link import tune_gil
from media.ports import FRAME_MS, PooledPort, fill, give_back, pcm_of, take_port

__all__ = ["UNDERRUN_FRAMES", "AudioFork", "ForkStats", "Track"]

log = logging.getLogger(__name__)

Track = Literal["inbound", "outbound", "both"]
TRACKS: tuple[Track, ...] = ("inbound", "outbound", "both")
# The queue ran dry and new audio came within this many ticks (100 ms): an underrun.
UNDERRUN_FRAMES = 5
MAX_START_FRAMES = 5  # the adaptive cushion's ceiling (100 ms)
_NEVER = 1 << 62  # the clock's "no cue pending" position
_AUDIO = pj.PJMEDIA_FRAME_TYPE_AUDIO
_LITTLE = sys.byteorder == "little"

_gil_tuned = False


@dataclass(frozen=True)
class ForkStats:
    frames_sent: int  # frames handed to on_audio (one per tick while started)
    frames_played: int  # playback frames given to the bridge (padded remainders included)
    underruns: int  # the queue ran dry and audio came again within UNDERRUN_FRAMES ticks
    killed_frames: int  # frames (and remainders) dropped by kill() / close()
    errors: int  # exceptions caught in the frame callbacks
    queued_frames: int  # playback frames waiting now (a remainder counts as one)


class _Owner:
    """What a pooled port calls on each tick (bound methods of the fork, no extra hop)."""

    def __init__(self, received: Callable[[pj.MediaFrame], None],
                 requested: Callable[[pj.MediaFrame], None]) -> None:
        self._on_frame_received = received
        self._on_frame_requested = requested


def _ignore(frame: pj.MediaFrame) -> None:
    """A port side the fork does not use."""


class AudioFork:
    """A call's audio to `on_audio` (one frame per 20 ms tick) and `play()`ed audio to the
    caller. `start()`, then `play` / `cue` / `kill` / `stats`, `close()` when done (also done
    when the call ends)."""

    def __init__(self, call: SipCall, track: Track, on_audio: Callable[[bytes], None], *,
                 jitter_ms: int = 20, max_queued_s: float = 120) -> None:
        if track not in TRACKS:
            raise ValueError(f"track must be one of {TRACKS}, got {track!r}")
        self.call = call
        self.track: Track = track
        self.clock_rate: int = int(call.endpoint.cfg.clock_rate)
        self.channels = 2 if track == "both" else 1
        self._mono_bytes = self.clock_rate * FRAME_MS // 1000 * 2
        self.frame_bytes = self._mono_bytes * self.channels  # bytes of each on_audio frame
        self._silence = bytes(self._mono_bytes)
        self._stereo = array.array("h", bytes(2 * self._mono_bytes))
        self._loop = call.loop
        self._call_soon = call.loop.call_soon_threadsafe
        self._on_audio = on_audio
        self._jitter_s = max(0, jitter_ms) / 1000.0
        self._start_frames = 2  # a spurt starts with this many frames queued ...
        self._start_wait_s = self._jitter_s  # ... or once its first frame waited this long
        self._max_frames = max(1, int(max_queued_s * 1000 / FRAME_MS))
        # Playback state, shared with the clock thread under _lock.
        self._lock = threading.Lock()
        self._queue: deque[bytes] = deque()
        self._rem = b""  # the tail shorter than a frame, waiting for more
        self._pending = 0  # len(_queue) + (1 if _rem): read without the lock by the clock
        self._playing = False  # in a talk spurt
        self._spurt_since = 0.0  # monotonic time the first frame of the next spurt was queued
        self._queued_total = 0  # frames ever queued (a remainder counts once cut or padded)
        self._given_total = 0  # frames ever given to the bridge from the queue
        self._cues: deque[tuple[int, Callable[[bool], None]]] = deque()
        self._next_cue = _NEVER  # _given_total at which the oldest cue is due
        self._cue_hop = False  # a _fire_cues is on its way to asyncio
        self._ticks = 0
        self._dry_tick = -_NEVER  # the tick at which the last spurt ran dry
        self._newest_out: bytes | None = None  # "both": the tap's latest frame
        # Counters (written on the clock thread, except killed/underruns under the lock).
        self._sent = self._played = self._underruns = self._killed = self._errors = 0
        self._started = self._closed = False
        self._play_port: PooledPort | None = None
        self._tap_port: PooledPort | None = None
        self._am: pj.AudioMedia | None = None
        self._am_id = -1

    # -- lifecycle (asyncio thread) -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Wire the fork's ports into the call's conference slot. CallGone if the call has no
        media (not answered yet, or over). Once only."""
        global _gil_tuned
        if self._closed:
            raise RuntimeError("fork closed")
        if self._started:
            return
        am = self.call.audio_media()  # CallGone when there is none
        self._started = True
        if not _gil_tuned:
            tune_gil()
            _gil_tuned = True
        rate = self.clock_rate
        try:
            play_port = take_port(rate, "fork")
            self._play_port = play_port
            if self.track == "inbound":
                play_port.owner = _Owner(self._on_inbound, self._on_play_request)
            elif self.track == "both":
                play_port.owner = _Owner(self._on_both, self._on_play_request)
            else:
                play_port.owner = _Owner(_ignore, self._on_play_request)
            if self.track != "inbound":
                tap = take_port(rate, "ftap")
                self._tap_port = tap
                tap.owner = _Owner(
                    self._on_outbound if self.track == "outbound" else self._on_tap_newest,
                    _ignore)
            self._wire(am)
        except BaseException:
            self.close()
            raise
        self.call.on_media.append(self._on_call_media)
        self.call.on_end.append(self._on_call_end)

    def close(self) -> None:
        """Unwire, give the ports back, drop queued playback; pending cues get fn(False).
        Idempotent. No on_audio call is made after it returns."""
        if self._closed:
            return
        self._closed = True
        call = self.call
        # Not while the call runs its on_end list (removing would skip the next hook); an
        # ended call calls neither list again.
        if self._started and not call.ended:
            if self._on_call_media in call.on_media:
                call.on_media.remove(self._on_call_media)
            if self._on_call_end in call.on_end:
                call.on_end.remove(self._on_call_end)
        self._drop(closing=True)
        play_port, tap = self._play_port, self._tap_port
        self._play_port = self._tap_port = None
        if tap is not None:
            call.remove_outbound_tap(tap)
            give_back(tap, self.clock_rate)
        if play_port is not None:
            give_back(play_port, self.clock_rate)  # stops every connection (media/ports.py)
        self._am = None

    def _wire(self, am: pj.AudioMedia) -> None:
        p, t = self._play_port, self._tap_port
        assert p is not None
        if self.track != "outbound":
            am.startTransmit(p)
        p.startTransmit(am)
        if t is not None:
            p.startTransmit(t)
            self.call.add_outbound_tap(t)
        self._am = am
        self._am_id = am.getPortId()

    def _on_call_media(self, am: pj.AudioMedia) -> None:
        """The call's media was renegotiated: follow its conference port if it moved."""
        if self._closed or self._play_port is None:
            return
        try:
            if am.getPortId() == self._am_id:
                return
            old, p = self._am, self._play_port
            if old is not None:
                for a, b in ((old, p), (p, old)):
                    try:
                        a.stopTransmit(b)
                    except pj.Error:
                        pass
            self._wire(am)
        except pj.Error as e:
            log.warning("fork on call %d: rewiring failed: %s", self.call.pj_id, e.info())

    def _on_call_end(self, _end: CallEnd) -> None:
        self.close()

    # -- playback (asyncio thread) --------------------------------------------------------------
    def play(self, pcm: bytes) -> bool:
        """Queue mono L16 (LE) at clock_rate, any length, for the caller. False (nothing
        queued) when closed or when it would take the queue above max_queued_s."""
        if self._closed:
            return False
        if not pcm:
            return True
        fb = self._mono_bytes
        with self._lock:
            data = self._rem + pcm if self._rem else pcm
            n = len(data) // fb
            queue = self._queue
            if len(queue) + n > self._max_frames:
                return False
            if self._pending == 0 and not self._playing:
                self._spurt_since = time.monotonic()
                if self._ticks - self._dry_tick <= UNDERRUN_FRAMES:
                    self._underruns += 1
                    # A sender that underran once will again: give its spurts one more
                    # frame of cushion (and of latency), up to MAX_START_FRAMES.
                    if self._start_frames < MAX_START_FRAMES:
                        self._start_frames += 1
                        self._start_wait_s += FRAME_MS / 1000.0
            if n:
                queue.extend([data[i:i + fb] for i in range(0, n * fb, fb)])
            self._rem = bytes(data[n * fb:])
            self._queued_total += n
            self._pending = len(queue) + (1 if self._rem else 0)
        return True

    def cue(self, fn: Callable[[bool], None]) -> None:
        """fn(True) on the asyncio thread once everything queued so far has been given to the
        bridge (soon, via call_soon, when nothing is queued); fn(False) if kill()/close()
        drops it first."""
        if self._closed:
            self._loop.call_soon(self._answer_cue, fn, False)
            return
        with self._lock:
            pos = self._queued_total + (1 if self._rem else 0)
            if pos <= self._given_total:
                due = True
            else:
                due = False
                self._cues.append((pos, fn))
                if len(self._cues) == 1:
                    self._next_cue = pos
        if due:
            self._loop.call_soon(self._answer_cue, fn, True)

    def kill(self) -> None:
        """Drop every queued frame and the remainder now: the next tick gives silence. Pending
        cues get fn(False)."""
        self._drop(closing=False)

    def _drop(self, *, closing: bool) -> None:
        with self._lock:
            self._killed += len(self._queue) + (1 if self._rem else 0)
            self._queue.clear()
            self._rem = b""
            self._pending = 0
            self._playing = False
            self._queued_total = self._given_total
            self._dry_tick = -_NEVER
            given = self._given_total
            cues = list(self._cues)
            self._cues.clear()
            self._next_cue = _NEVER
        for pos, fn in cues:
            # A cue whose audio had all gone out (its hop still on the way) played: True.
            self._loop.call_soon(self._answer_cue, fn, pos <= given)

    def stats(self) -> ForkStats:
        return ForkStats(self._sent, self._played, self._underruns, self._killed, self._errors,
                         self._pending)

    def _fire_cues(self) -> None:
        """The clock reached a cue's position (asyncio thread)."""
        self._cue_hop = False
        fired: list[Callable[[bool], None]] = []
        with self._lock:
            cues, given = self._cues, self._given_total
            while cues and cues[0][0] <= given:
                fired.append(cues.popleft()[1])
            self._next_cue = cues[0][0] if cues else _NEVER
        for fn in fired:
            self._answer_cue(fn, True)

    def _answer_cue(self, fn: Callable[[bool], None], ok: bool) -> None:
        try:
            fn(ok)
        except Exception:
            log.exception("fork on call %d: a cue callback failed", self.call.pj_id)

    def _deliver(self, pcm: bytes) -> None:
        """A frame on the asyncio thread (none after close())."""
        if not self._closed:
            self._on_audio(pcm)

    # -- frame callbacks (clock thread; never raise) ---------------------------------------------
    def _frame_pcm(self, frame: pj.MediaFrame) -> bytes:
        if frame.type != _AUDIO:
            return self._silence
        pcm = pcm_of(frame.buf)
        if len(pcm) != self._mono_bytes:
            pcm = (pcm + self._silence)[:self._mono_bytes]
        return pcm

    def _on_inbound(self, frame: pj.MediaFrame) -> None:
        """P hears the caller: the inbound track's frame of this tick."""
        try:
            if self._closed:
                return
            pcm = self._frame_pcm(frame)
            self._sent += 1
            self._call_soon(self._deliver, pcm)
        except Exception:
            self._errors += 1

    _on_outbound = _on_inbound  # T hears what the gateway plays: the outbound track's frame

    def _on_tap_newest(self, frame: pj.MediaFrame) -> None:
        """"both": keep T's frame for the next stereo frame."""
        try:
            self._newest_out = self._frame_pcm(frame)
        except Exception:
            self._errors += 1

    def _on_both(self, frame: pj.MediaFrame) -> None:
        """P hears the caller: pair it with the tap's newest frame, caller left."""
        try:
            if self._closed:
                return
            left = self._frame_pcm(frame)
            right = self._newest_out
            self._newest_out = None
            st = self._stereo
            st[0::2] = array.array("h", left)
            st[1::2] = array.array("h", right if right is not None else self._silence)
            if not _LITTLE:
                st.byteswap()
            self._sent += 1
            self._call_soon(self._deliver, st.tobytes())
        except Exception:
            self._errors += 1

    def _on_play_request(self, frame: pj.MediaFrame) -> None:
        """The bridge asks P for this tick's frame: the queue's oldest, or nothing (silence)."""
        try:
            self._ticks += 1
            if not self._pending:
                if self._playing:  # the spurt ran dry (once per spurt: the lock is cheap)
                    with self._lock:
                        if not self._pending:
                            self._playing = False
                            self._dry_tick = self._ticks
                return
            with self._lock:
                pcm = self._next_frame_locked()
            if pcm is None:
                return
            fill(frame, pcm)
            if self._given_total >= self._next_cue and not self._cue_hop:
                self._cue_hop = True
                self._call_soon(self._fire_cues)
        except Exception:
            self._errors += 1

    def _next_frame_locked(self) -> bytes | None:
        queue = self._queue
        if not self._playing:
            if self._pending == 0:
                return None
            if (len(queue) < self._start_frames
                    and time.monotonic() - self._spurt_since < self._start_wait_s):
                return None  # the spurt waits for its cushion of frames, or for jitter_ms
            self._playing = True
        if queue:
            pcm = queue.popleft()
        elif self._rem:
            pcm = self._rem + self._silence[len(self._rem):]
            self._rem = b""
            self._queued_total += 1
        else:
            self._playing = False
            self._dry_tick = self._ticks
            return None
        self._pending -= 1
        self._given_total += 1
        self._played += 1
        return pcm
