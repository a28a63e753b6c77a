"""One end of a cross-process audio link: a conference port whose frames ride loopback UDP.

A `MediaLink` owns a pjsua2 `AudioMediaPort` (mono, 16-bit, 20 ms at the bridge's clock rate;
`audio_media`, pooled and reused, never deleted at run time: see media/ports.py) and a non-blocking
UDP socket bound on a loopback address (`local_addr`). What the bridge sends the port
(`onFrameReceived`) leaves as one datagram per frame (a 4-byte big-endian sequence number, then
the PCM) to the peer link; what the port gives the bridge (`onFrameRequested`) is the oldest of
the frames received from the peer, kept in a jitter queue of at most `JITTER_FRAMES` (the
oldest is dropped beyond it; a frame plays as soon as one is queued; silence when none; a queue
that stayed 2 or more deep for TRIM_WINDOW frames is cut by one, so a burst of late datagrams
does not add latency for the rest of the call). A link costs no call slot: it is how media
crosses worker processes (see docs/media-design.md).

Why the socket I/O runs in the frame callbacks, on the conference clock thread, against the
house rule that pjsua2 callbacks only `call_soon_threadsafe` to asyncio: a frame is due every
20 ms and the bridge asks for it synchronously; a hop through the event loop (and back) would
add a loop's latency and jitter to every frame and cost more CPU than the I/O itself. A
non-blocking `send` / `recv` on a loopback socket is a syscall of a few microseconds that never
waits, so doing it in place is both the fastest and the most predictable option. The price is
the GIL: each callback takes it, so a CPU-bound asyncio thread delays the bridge's clock (all
the worker's calls; `tune_gil`); see bench/link.py for the figures. The callbacks touch nothing
but this object's socket, queue and counters, and never raise (errors are counted in
`stats().errors`).

Frames are copied with media/ports.py's `pcm_of` / `fill` (~2 µs instead of SWIG's ~145 µs).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections import deque
from dataclasses import dataclass

import pjsua2 as pj

from media.ports import FRAME_MS, PooledPort, fill, give_back, pcm_of, pooled_ports, take_port

__all__ = ["JITTER_FRAMES", "TRIM_WINDOW", "LinkStats", "MediaLink", "pooled_ports",
           "release_closed", "tune_gil"]

log = logging.getLogger(__name__)

JITTER_FRAMES = 3  # at most this many frames wait in the queue (60 ms); the oldest is dropped
# A queue that never fell below 2 frames for this many requests holds a frame of latency it
# does not need (a burst once filled it and the steady flow keeps it full): drop one.
TRIM_WINDOW = 50
_HEADER = struct.Struct("!I")


@dataclass(frozen=True)
class LinkStats:
    sent: int  # datagrams sent to the peer (one per audio frame the bridge gave the port)
    received: int  # datagrams from the peer with a frame of the right size
    played: int  # frames given to the bridge from the queue
    silence: int  # frames given to the bridge as silence (queue empty)
    dropped_late: int  # received frames never played: out of order, or pushed out of the queue
    trimmed: int  # frames dropped to cut a standing queue (see TRIM_WINDOW)
    depth_sum: int  # sum over requests of the frames queued (depth_sum / requests: mean depth)
    errors: int  # exceptions caught in the callbacks, send failures, malformed datagrams


class MediaLink:
    """One end of a UDP audio link. Create, `connect(peer.local_addr)`, wire `audio_media`
    into a MixGraph, `close()` when done. Every method runs on the asyncio thread (or any
    thread registered with pjsua2); only the two frame callbacks run on the clock thread."""

    def __init__(self, clock_rate: int, host: str = "127.0.0.1") -> None:
        self.clock_rate = clock_rate
        self.frame_bytes = clock_rate * FRAME_MS // 1000 * 2
        self._silence = bytes(self.frame_bytes)
        self._datagram = _HEADER.size + self.frame_bytes
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.bind((host, 0))
        self.local_addr: tuple[str, int] = self._sock.getsockname()
        self.peer_addr: tuple[str, int] | None = None
        self._queue: deque[bytes] = deque()
        self._seq_out = 0
        self._last_seq = -1  # the newest sequence number queued (drop anything not newer)
        self._sent = self._received = self._played = self._silent = 0
        self._dropped = self._errors = self._trimmed = self._depth_sum = 0
        self._window = 0  # requests in the current trim window
        self._window_min = JITTER_FRAMES  # the fewest frames queued at a request in it
        self._closed = False
        try:
            self._port: PooledPort = take_port(clock_rate, "link")
        except BaseException:
            self._closed = True
            self._sock.close()
            raise
        self._port.owner = self

    # -- control (asyncio thread) -------------------------------------------------------------
    def connect(self, peer_addr: tuple[str, int]) -> None:
        """Send to, and only accept frames from, `peer_addr` (the other end's `local_addr`)."""
        self._sock.connect(peer_addr)
        self.peer_addr = (str(peer_addr[0]), int(peer_addr[1]))

    @property
    def audio_media(self) -> pj.AudioMedia:
        """The link's conference port (what a MixGraph connects)."""
        return self._port

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> LinkStats:
        return LinkStats(self._sent, self._received, self._played, self._silent,
                         self._dropped, self._trimmed, self._depth_sum, self._errors)

    def close(self) -> None:
        """Stop sending and playing, close the socket, disconnect the port, give it back.

        Remove the link from its MixGraph first (MixGraph.remove); whatever connection is left
        is stopped here. The port is not deleted (see _Port): it goes back to the pool, to be
        reused RELEASE_DELAY_S later, once the queued stopTransmits have long run."""
        if self._closed:
            return
        self._closed = True
        port = self._port
        port.owner = None
        self._queue.clear()
        self._sock.close()
        give_back(port, self.clock_rate)

    # -- frame callbacks (clock thread, through _Port; never raise) ------------------------------
    def _on_frame_received(self, frame: pj.MediaFrame) -> None:
        """What the bridge mixed for this port: one datagram to the peer."""
        try:
            if self._closed or self.peer_addr is None:
                return
            if frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO:
                return
            pcm = pcm_of(frame.buf)
            if not pcm:
                return
            self._sock.send(_HEADER.pack(self._seq_out & 0xFFFFFFFF) + pcm)
            self._seq_out += 1
            self._sent += 1
        except OSError as e:
            # ECONNREFUSED: the peer's socket is not there (yet, or any more); nothing to do.
            if e.errno != errno.ECONNREFUSED:
                self._errors += 1
        except Exception:
            self._errors += 1

    def _on_frame_requested(self, frame: pj.MediaFrame) -> None:
        """Give the bridge the oldest queued frame from the peer, or silence."""
        try:
            if self._closed:
                return
            self._drain()
            queue = self._queue
            depth = len(queue)
            self._depth_sum += depth
            if depth < self._window_min:
                self._window_min = depth
            self._window += 1
            if self._window >= TRIM_WINDOW:
                if self._window_min >= 2:
                    queue.popleft()
                    self._trimmed += 1
                self._window, self._window_min = 0, JITTER_FRAMES
            if queue:
                fill(frame, queue.popleft())
                self._played += 1
            else:
                fill(frame, self._silence)
                self._silent += 1
        except Exception:
            self._errors += 1

    def _drain(self) -> None:
        sock, queue = self._sock, self._queue
        while True:
            try:
                data = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNREFUSED from an earlier send: read on
                continue
            if len(data) != self._datagram:
                self._errors += 1
                continue
            self._received += 1
            seq = _HEADER.unpack_from(data)[0]
            if self._last_seq >= 0 and not _newer(seq, self._last_seq):
                self._dropped += 1  # late (reordered or duplicated): its moment has passed
                continue
            self._last_seq = seq
            if len(queue) >= JITTER_FRAMES:
                queue.popleft()
                self._dropped += 1
            queue.append(data[_HEADER.size:])



def _newer(seq: int, last: int) -> bool:
    """Serial-number comparison of 32-bit sequence numbers (RFC 1982)."""
    return 0 < ((seq - last) & 0xFFFFFFFF) < 0x80000000


SWITCH_INTERVAL_S = 0.001


def tune_gil(interval_s: float = SWITCH_INTERVAL_S) -> None:
    """Make a CPU-bound thread hand the GIL over sooner (Python's default is 5 ms). Call it
    once in a process that hosts links: each frame callback waits for the GIL, and with the
    default interval a busy asyncio thread slowed the bridge's clock to 56-75 % of real time
    with 8 links (bench/link.py); at 1 ms it stayed on time."""
    import sys

    sys.setswitchinterval(interval_s)




def release_closed() -> None:
    """Kept for callers of the first version: ports are pooled now, never deleted at run time."""


