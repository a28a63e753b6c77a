"""rtpengine as a child process of the node: the media relay between browsers (DTLS-SRTP, ICE,
rtcp-mux) and the workers' plain RTP. Kamailio drives it over the ng protocol (its rtpengine
module); the node only starts it, checks it answers `ping`, restarts it when it dies and stops it.

Userspace forwarding (`--table=-1`): no kernel module (Debian's `rtpengine-daemon` alone, not the
`rtpengine` metapackage that pulls a DKMS build). No config file is read (`--config-file=none`):
every setting is on the command line, from `[webrtc]`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from gateway.childproc import die_with_parent

log = logging.getLogger(__name__)
proc_log = logging.getLogger(__name__ + ".proc")


class RtpengineError(RuntimeError):
    """rtpengine is missing, did not start, or does not answer."""


@dataclass(frozen=True)
class RtpengineConfig:
    address: str  # where browsers (and workers) send media
    ng_port: int
    port_min: int
    port_max: int
    binary: str = "rtpengine"
    log_level: int = 5  # syslog levels: 5 notice, 6 info, 7 debug

    @property
    def ng_sock(self) -> str:
        """The ng control address as Kamailio's rtpengine module names it."""
        return f"udp:127.0.0.1:{self.ng_port}"

    def argv(self, binary: str) -> list[str]:
        return [
            binary, "--foreground", "--log-stderr", "--config-file=none", "--table=-1",
            f"--interface={self.address}", f"--listen-ng=127.0.0.1:{self.ng_port}",
            f"--port-min={self.port_min}", f"--port-max={self.port_max}",
            f"--log-level={self.log_level}", "--delete-delay=0",
        ]


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        p = Path(d, name)
        if "/" not in name and p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def _bencode_str(s: str) -> bytes:
    b = s.encode()
    return str(len(b)).encode() + b":" + b


async def ng_ping(port: int, timeout: float = 0.5) -> bool:
    """One ng `ping` to 127.0.0.1:port; True when rtpengine answers `pong`."""
    loop = asyncio.get_running_loop()
    cookie = secrets.token_hex(6)
    msg = cookie.encode() + b" d" + _bencode_str("command") + _bencode_str("ping") + b"e"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        await loop.sock_sendall(sock, msg)
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
    return data.startswith(cookie.encode() + b" ") and b"pong" in data


_LEVEL = re.compile(r"\b(ERR|CRIT|ALERT|EMERG|WARNING|WARN|NOTICE|INFO|DEBUG)\b")
_LEVELS = {"ERR": logging.ERROR, "CRIT": logging.ERROR, "ALERT": logging.ERROR,
           "EMERG": logging.ERROR, "WARNING": logging.WARNING, "WARN": logging.WARNING}


class Rtpengine:
    """`start()` / `stop()`; `supervise()` (a task) keeps it running until stopped."""

    def __init__(self, cfg: RtpengineConfig, start_timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.start_timeout = start_timeout
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=30)
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        if self.running:
            return
        binary = find_binary(self.cfg.binary)
        if binary is None:
            raise RtpengineError(
                f"{self.cfg.binary!r} not found (install the Debian package rtpengine-daemon)")
        self._stopping = False
        self._tail.clear()
        if await ng_ping(self.cfg.ng_port, 0.2):
            # another node's rtpengine (or a stale one) holds the port: its pong would pass
            # for ours, and Kamailio would drive the wrong relay
            raise RtpengineError(f"127.0.0.1:{self.cfg.ng_port} already answers ng (another "
                                 "rtpengine?): set [webrtc] rtpengine_ng_port")
        self._proc = await asyncio.create_subprocess_exec(
            *self.cfg.argv(binary),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        assert self._proc.stderr is not None
        self._reader = asyncio.create_task(self._pump(self._proc.stderr), name="rtpengine-log")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while loop.time() < deadline:
            if not self.running:
                await asyncio.sleep(0.1)
                raise RtpengineError(f"rtpengine exited with {self._proc.returncode} while "
                                     f"starting:\n" + "\n".join(self._tail))
            if await ng_ping(self.cfg.ng_port, 0.3):
                log.info("rtpengine ready (pid %d): media on %s:%d-%d, ng 127.0.0.1:%d",
                         self._proc.pid, self.cfg.address, self.cfg.port_min, self.cfg.port_max,
                         self.cfg.ng_port)
                return
            await asyncio.sleep(0.05)
        await self._terminate()
        raise RtpengineError(f"rtpengine not answering ng ping on 127.0.0.1:{self.cfg.ng_port}")

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self._tail.append(line)
            m = _LEVEL.search(line)
            lvl = _LEVELS.get(m.group(1), logging.INFO) if m else logging.INFO
            proc_log.log(logging.INFO if self._stopping else lvl, "%s", line)

    async def stop(self) -> None:
        self._stopping = True
        await self._terminate()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    log.warning("rtpengine (pid %d) ignored SIGTERM; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 1)
            self._reader = None

    async def supervise(self, max_backoff: float = 30.0) -> None:
        """Restart rtpengine whenever it exits, until `stop()` or cancellation (which stops
        it). Calls in progress lose their browser media when it dies; new calls work again
        once it is back."""
        backoff = 0.5
        try:
            while not self._stopping:
                if not self.running:
                    try:
                        await self.start()
                        backoff = 0.5
                    except (RtpengineError, OSError) as e:
                        log.error("rtpengine did not start: %s; retrying in %.1fs", e, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, max_backoff)
                        continue
                assert self._proc is not None
                code = await self._proc.wait()
                if self._stopping:
                    break
                self.restarts += 1
                log.error("rtpengine exited with %s; restarting", code)
        finally:
            if not self._stopping:
                await self.stop()
