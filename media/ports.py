"""Python conference ports that are safe to drop, and fast frame copies, for this wheel.

Every Python `AudioMediaPort` (a media link's, in-band DTMF's) comes from here: taken from a
pool and given back, never deleted while the library runs (see `PooledPort`). Its callbacks
go to the port's current `owner` (`_on_frame_received` / `_on_frame_requested`).

Frame copies: in this SWIG binding `bytes(frame.buf)` walks the `std::vector<uint8_t>` element
by element (~145 µs per 320-byte frame). `pcm_of` instead reads the vector's data pointer
(libstdc++ layout: begin, end, capacity pointers) and copies with `ctypes.string_at` (~1.5 µs);
`fill` resizes the vector and `memmove`s into it (~2.4 µs; `frame.buf = pj.ByteVector(pcm)`
costs ~9 µs). The layout is checked once at import on a vector of known content; if the check
fails, both fall back to the slow, safe SWIG paths (`FAST` is False). Measured: bench/link.py.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import time
from typing import Any, Protocol

import pjsua2 as pj

FRAME_MS = 20
RELEASE_DELAY_S = 0.25  # a returned port is reused no sooner than this (its stopTransmits ran)
_PTR = ctypes.sizeof(ctypes.c_void_p)


class FrameOwner(Protocol):
    """Whoever holds a pooled port: its callbacks, on the clock thread; they must not raise."""

    def _on_frame_received(self, frame: pj.MediaFrame) -> None: ...

    def _on_frame_requested(self, frame: pj.MediaFrame) -> None: ...


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


FAST = _layout_ok()


def pcm_of(vec: Any) -> bytes:
    """The bytes of a frame's buffer (a SWIG ByteVector)."""
    if FAST:
        begin, size = _vector_span(vec)
        return ctypes.string_at(begin, size) if size > 0 else b""
    return bytes(vec)


def fill(frame: Any, pcm: bytes) -> None:
    """Make `frame` an audio frame carrying `pcm`."""
    n = len(pcm)
    if FAST:
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


class PooledPort(pj.AudioMediaPort):  # type: ignore[misc]
    """A Python conference port, pooled: never deleted while the library runs.

    Why pooled: the bridge calls every port's put_frame on every tick, connected or not, so the
    clock thread can be inside (or waiting for the GIL to enter) this object's callback at any
    moment. Deleting a Python AudioMediaPort then frees what that callback uses (seen: deleting
    links 10 ms after their stopTransmit segfaulted within 400 tries; ~AudioMediaPort also
    releases the port's memory while its queued removal is pending). So a closed link's port
    goes back to a pool, disconnected, and the next MediaLink takes it. Idle, it costs ~50
    no-op callbacks a second."""

    owner: FrameOwner | None = None  # class default: a callback during teardown finds none

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
_free: dict[int, list[tuple[float, int, PooledPort]]] = {}
_all_ports: list[PooledPort] = []  # every port made: the references that keep them alive


def take_port(clock_rate: int, name: str = "port") -> PooledPort:
    """A free port of `clock_rate` (reused once RELEASE_DELAY_S has passed since its return),
    or a new one; `give_back` it when done."""
    now = time.monotonic()
    lib = _lib_id()
    pool = _free.setdefault(clock_rate, [])
    pool[:] = [e for e in pool if e[1] == lib]  # a destroyed library's ports: never reused
    for i, (ready, _lib, port) in enumerate(pool):
        if ready <= now:
            del pool[i]
            return port
    port = PooledPort()
    fmt = pj.MediaFormatAudio()
    fmt.type = pj.PJMEDIA_TYPE_AUDIO
    fmt.clockRate = clock_rate
    fmt.channelCount = 1
    fmt.bitsPerSample = 16
    fmt.frameTimeUsec = FRAME_MS * 1000
    port.createPort(f"{name}{len(_all_ports)}", fmt)
    _all_ports.append(port)
    return port


def disconnect_all(port: PooledPort) -> None:
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


def give_back(port: PooledPort, clock_rate: int) -> None:
    """Disconnect `port` from everything and return it to the pool (asyncio thread)."""
    port.owner = None
    disconnect_all(port)
    _free.setdefault(clock_rate, []).append((time.monotonic() + RELEASE_DELAY_S, _lib_id(), port))


def pooled_ports() -> int:
    """Ports made so far in this process (in use or pooled)."""
    return len(_all_ports)


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
