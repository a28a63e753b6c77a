"""One end of a cross-process audio link: a conference port whose frames ride loopback UDP.

A `MediaLink` owns a pjsua2 `AudioMediaPort` (mono, 16-bit, 20 ms at the bridge's clock rate;
`audio_media`, pooled and reused, never deleted at run time: see `_Port`) and a non-blocking
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

Frame copies: in this SWIG binding `bytes(frame.buf)` walks the `std::vector<uint8_t>` element
by element (~145 µs per 320-byte frame). `_pcm_of` instead reads the vector's data pointer
(libstdc++ layout: begin, end, capacity pointers) and copies with `ctypes.string_at` (~1.5 µs);
`_fill` resizes the vector and `memmove`s into it (~2.4 µs; `frame.buf = pj.ByteVector(pcm)`
costs ~9 µs). The layout is checked once at import on a vector of known content; if the check
fails, both fall back to the slow, safe SWIG paths (`_FAST` is False).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import logging
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pjsua2 as pj

log = logging.getLogger(__name__)

JITTER_FRAMES = 3  # at most this many frames wait in the queue (60 ms); the oldest is dropped
# A queue that never fell below 2 frames for this many requests holds a frame of latency it
# does not need (a burst once filled it and the steady flow keeps it full): drop one.
TRIM_WINDOW = 50
FRAME_MS = 20
RELEASE_DELAY_S = 0.25  # a closed link's port is reused no sooner than this after close()
_HEADER = struct.Struct("!I")
_PTR = ctypes.sizeof(ctypes.c_void_p)


def _vector_span(vec: Any) -> tuple[int, int]:
    """(data pointer, size in bytes) of a SWIG ByteVector, read from its libstdc++ layout."""
    addr = int(vec.this)
    begin = ctypes.c_void_p.from_address(addr).value or 0
    end = ctypes.c_void_p.from_address(addr + _PTR).value or 0
    return begin, end - begin


def _layout_ok() -> bool:
    try:
        probe = bytes(range(256)) + b"\x01\x02\x03"
        vec = pj.ByteVector(probe)
        begin, size = _vector_span(vec)
        if size != len(probe) or ctypes.string_at(begin, size) != probe:
            return False
        vec.resize(8)
        begin, size = _vector_span(vec)
        ctypes.memmove(begin, b"abcdefgh", 8)
        return size == 8 and bytes(vec) == b"abcdefgh"
    except Exception:  # any surprise in the binding: use the slow paths
        return False


_FAST = _layout_ok()


def _pcm_of(vec: Any) -> bytes:
    """The bytes of a frame's buffer (a SWIG ByteVector)."""
    if _FAST:
        begin, size = _vector_span(vec)
        return ctypes.string_at(begin, size) if size > 0 else b""
    return bytes(vec)


def _fill(frame: Any, pcm: bytes) -> None:
    """Make `frame` an audio frame carrying `pcm`."""
    n = len(pcm)
    if _FAST:
        vec = frame.buf
        vec.resize(n)
        begin, size = _vector_span(vec)
        if size == n:
            ctypes.memmove(begin, pcm, n)
        else:  # never seen; keep the frame right anyway
            frame.buf = pj.ByteVector(pcm)
    else:
        frame.buf = pj.ByteVector(pcm)
    frame.size = n
    frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO


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


class _Port(pj.AudioMediaPort):  # type: ignore[misc]
    """The conference port of a link, pooled: never deleted while the library runs.

    Why pooled: the bridge calls every port's put_frame on every tick, connected or not, so the
    clock thread can be inside (or waiting for the GIL to enter) this object's callback at any
    moment. Deleting a Python AudioMediaPort then frees what that callback uses (seen: deleting
    links 10 ms after their stopTransmit segfaulted within 400 tries; ~AudioMediaPort also
    releases the port's memory while its queued removal is pending). So a closed link's port
    goes back to a pool, disconnected, and the next MediaLink takes it. Idle, it costs ~50
    no-op callbacks a second."""

    owner: MediaLink | None = None  # class default: a callback during teardown finds none

    def onFrameReceived(self, frame: pj.MediaFrame) -> None:
        owner = self.owner
        if owner is not None:
            owner._on_frame_received(frame)

    def onFrameRequested(self, frame: pj.MediaFrame) -> None:
        owner = self.owner
        if owner is not None:
            owner._on_frame_requested(frame)

    def __del__(self) -> None:
        # Dropped after libDestroy (interpreter exit): ~AudioMediaPort would call into the
        # destroyed library and abort. Leak it instead.
        try:
            if not _lib_running():
                self.thisown = False
        except Exception:
            pass


# clock rate -> (reusable from, the library instance it belongs to, port)
_free: dict[int, list[tuple[float, int, _Port]]] = {}
_all_ports: list[_Port] = []  # every port made: the references that keep them alive


def _take_port(clock_rate: int) -> _Port:
    now = time.monotonic()
    lib = _lib_id()
    pool = _free.setdefault(clock_rate, [])
    pool[:] = [e for e in pool if e[1] == lib]  # a destroyed library's ports: never reused
    for i, (ready, _lib, port) in enumerate(pool):
        if ready <= now:
            del pool[i]
            return port
    port = _Port()
    fmt = pj.MediaFormatAudio()
    fmt.type = pj.PJMEDIA_TYPE_AUDIO
    fmt.clockRate = clock_rate
    fmt.channelCount = 1
    fmt.bitsPerSample = 16
    fmt.frameTimeUsec = FRAME_MS * 1000
    port.createPort(f"link{len(_all_ports)}", fmt)
    _all_ports.append(port)
    return port


def _disconnect_all(port: _Port) -> None:
    """Stop every connection from and to `port` (what a MixGraph may have left). Every port of
    the bridge, both ways: `ConfPortInfo.listeners` reads garbage in this wheel (seen), and a
    stopTransmit of a connection that does not exist is a no-op."""
    pid = port.getPortId()
    try:
        others = pj.Endpoint.instance().mediaEnumPorts2()
    except pj.Error:
        return
    for am in others:
        if am.getPortId() == pid:
            continue
        with contextlib.suppress(pj.Error):
            port.stopTransmit(am)
        with contextlib.suppress(pj.Error):
            am.stopTransmit(port)


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
            self._port: _Port = _take_port(clock_rate)
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
        _disconnect_all(port)
        _free.setdefault(self.clock_rate, []).append(
            (time.monotonic() + RELEASE_DELAY_S, _lib_id(), port))

    # -- frame callbacks (clock thread, through _Port; never raise) ------------------------------
    def _on_frame_received(self, frame: pj.MediaFrame) -> None:
        """What the bridge mixed for this port: one datagram to the peer."""
        try:
            if self._closed or self.peer_addr is None:
                return
            if frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO:
                return
            pcm = _pcm_of(frame.buf)
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
                _fill(frame, queue.popleft())
                self._played += 1
            else:
                _fill(frame, self._silence)
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


def pooled_ports() -> int:
    """Ports made so far in this process (in use or pooled)."""
    return len(_all_ports)


def release_closed() -> None:
    """Kept for callers of the first version: ports are pooled now, never deleted at run time."""


@atexit.register
def _leak_at_exit() -> None:
    # At interpreter exit the library is destroyed (or about to be): never run ~AudioMediaPort.
    for port in _all_ports:
        with contextlib.suppress(Exception):
            port.owner = None
            port.thisown = False


def _lib_id() -> int:
    try:
        return int(pj.Endpoint.instance().this)
    except Exception:
        return 0


def _lib_running() -> bool:
    try:
        return bool(pj.Endpoint.instance().libGetState() == pj.PJSUA_STATE_RUNNING)
    except Exception:
        return False
