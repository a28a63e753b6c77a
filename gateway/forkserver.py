"""The fork server ("zygote"): one process that has imported everything a worker needs, and
forks workers from itself, so they start in milliseconds and share those pages.

A spawned worker (`python -m gateway.workers.worker`) imports ~60 MB of Python (aiohttp,
pydantic, numpy, soundfile, pjsua2, the DSL) on its own: about a second of CPU each, and its
own copy of every page. The zygote imports them once, loads the settings, calls `gc.freeze()`
(the collector then never writes to those objects' headers, which would unshare their pages),
and waits. On the supervisor's request it forks; the child becomes the worker (its pjsua2
`libCreate`, event loop and threads all start after the fork). So the zygote must stay
single-threaded, without an event loop or pjsua2 library: a thread would not exist in the
child, and whatever lock it held would stay held there forever. It checks that before each fork.

Protocol, over a SOCK_SEQPACKET socketpair (one JSON object per packet):
  zygote -> supervisor  {"op": "ready", "pid": P}
  supervisor -> zygote  {"op": "lock"}  + the storage lock's fd (SCM_RIGHTS), before any fork
  supervisor -> zygote  {"op": "fork", "id": N, "index": I, "max_calls": M}  + the worker's
                        IPC socket (SCM_RIGHTS)
  zygote -> supervisor  {"op": "forked", "id": N, "pid": P}  + a pidfd of the child, or
                        {"op": "error", "id": N, "error": "..."}
  zygote -> supervisor  {"op": "exited", "pid": P, "code": C}  (C as Popen.returncode:
                        negative for a signal)
The zygote reaps its children (it is their parent) and reports their exit; the supervisor
holds each worker's pidfd, so it signals the right process and sees it die even when the
zygote is gone. The zygote exits when the supervisor closes its end (or dies). It holds the
storage lock (gateway/node.py: the same open file as the supervisor's, so the same flock), and
so do the workers it forks. The CLI launches it before the supervisor's own imports, which it
overlaps.

usage: python -m gateway.forkserver --control-fd FD [--config FILE]
"""

from __future__ import annotations

import os

# Before numpy: OpenBLAS (and friends) start a thread pool at import, and the zygote must have
# no thread when it forks. Workers do no linear algebra worth threads. (The supervisor also
# starts the zygote with these set: THREAD_ENV.)
if __name__ == "__main__":
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse
import asyncio
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_PACKET = 4096
# Room kept in the zygote's command line for its children's titles (see set_title).
TITLE_ROOM = 120
# Modules a worker imports at some point of its life (some lazily, inside functions): all of
# them in the zygote, so no child imports anything itself.
PRELOAD = (
    "gateway.workers.worker",
    "gateway.workers.commands",
    "gateway.calls.outbound",
    "gateway.kamailio",
    "media.call",
    "media.dtmf_inband",
    "media.probe",
    "soundfile",
    "numpy",
    "pjsua2",
)
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ForkServerUnavailable(Exception):
    """The fork server is not running (it died, or never started): spawn the worker instead."""


# -- the zygote (its own process) -----------------------------------------------------------


def thread_count() -> int:
    """Threads of this process as the kernel sees them (C libraries' threads included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def set_title(title: str) -> None:
    """Rewrite this process's command line (what ps, pgrep -f and /proc/PID/cmdline show),
    within the room the original one took. A forked worker otherwise looks like the zygote."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # proc(5): arg_start and arg_end are fields 48 and 49; `fields` starts at field 3.
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return
    room = end - start
    if room < 2:
        return
    data = title.encode()[: room - 2] + b"\0"
    # Last byte not NUL: the kernel then reads the title up to its first NUL (setproctitle's
    # convention) instead of the whole original argument area.
    data += b" " * (room - len(data))
    ctypes.memmove(start, data, room)


def preload(config: Path | None) -> Any:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from config.settings import load_settings

    return load_settings(config)


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve(control: socket.socket, settings: Any) -> int:
    """The zygote's loop: fork on request, report exits, until the supervisor goes away."""
    from gateway.workers.worker import run_forked

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd is what wakes poll
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    gc.collect()
    gc.freeze()
    _send(control, {"op": "ready", "pid": os.getpid()})

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            with contextlib.suppress(OSError):
                _send(control, {"op": "exited", "pid": pid, "code": _exit_code(status)})

    lock_fd: int | None = None
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                reap()
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, MAX_PACKET, 4)
            except OSError:
                data, fds = b"", []
            if not data:
                return 0  # the supervisor is gone: so are we (our children notice on their own)
            try:
                req = json.loads(data)
            except ValueError:
                for fd_ in fds:
                    os.close(fd_)
                continue
            if req.get("op") == "lock" and len(fds) == 1:
                if lock_fd is not None:
                    os.close(lock_fd)
                lock_fd = fds[0]  # kept open: every child inherits it (the storage lock)
                continue
            if req.get("op") != "fork" or len(fds) != 1:
                for fd_ in fds:
                    os.close(fd_)
                _send(control, {"op": "error", "id": req.get("id"), "error": "bad request"})
                continue
            ipc_fd = fds[0]
            threads = thread_count()
            if threads != 1 or threading.active_count() != 1:
                # Never fork with a thread: its locks would stay held in the child.
                os.close(ipc_fd)
                _send(control, {"op": "error", "id": req["id"],
                                "error": f"the fork server has {threads} threads"})
                continue
            gc.freeze()  # what the loop allocated since: frozen too, before the child sees it
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    control.close()
                    signal.set_wakeup_fd(-1)
                    os.close(wake_r)
                    os.close(wake_w)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    index, max_calls = int(req["index"]), int(req["max_calls"])
                    set_title(f"{sys.executable} -m gateway.workers.worker --index {index} "
                              f"--max-calls {max_calls} (forked)")
                    code = run_forked(settings, index, ipc_fd, max_calls)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                finally:
                    with contextlib.suppress(Exception):
                        sys.stderr.flush()
                    os._exit(code)
            os.close(ipc_fd)
            try:
                pidfd = os.pidfd_open(pid)  # before we could reap it: it is this child
            except OSError as e:
                _send(control, {"op": "error", "id": req["id"], "error": f"pidfd_open: {e}"})
                continue
            try:
                _send(control, {"op": "forked", "id": req["id"], "pid": pid}, [pidfd])
            finally:
                os.close(pidfd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gateway.forkserver")
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--title-room", default="")  # only its length matters (set_title)
    args = ap.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    control.setblocking(True)
    try:
        settings = preload(args.config)
    except Exception as e:
        print(f"fork server: cannot preload: {e}", file=sys.stderr, flush=True)
        return 1
    from gateway.logs import setup_logging

    setup_logging(settings.log.level, settings.log.json_format, "forkserver")
    if thread_count() != 1:
        log.error("fork server: %d threads after imports; it cannot fork safely",
                  thread_count())
        return 1
    return serve(control, settings)


# -- the supervisor's side ------------------------------------------------------------------


class ForkedProcess:
    """A worker forked by the zygote, as the supervisor holds it: the part of
    `asyncio.subprocess.Process` the node uses (pid, returncode, wait, kill, send_signal)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd: int | None = pidfd
        self._code: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._exited = asyncio.Event()
        self.returncode: int | None = None
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit)

    def _on_exit(self) -> None:
        # The pidfd reads as ready once the process has exited (zombie or reaped): nothing is
        # left to signal, so it closes now (whether anyone waits or not).
        self._close()
        self._exited.set()

    def _reported(self, code: int | None) -> None:
        if not self._code.done():
            self._code.set_result(code)

    async def wait(self) -> int | None:
        """The exit code (negative: killed by that signal); None when the zygote that could
        tell died first (the process is gone all the same)."""
        if self.returncode is not None:
            return self.returncode
        await self._exited.wait()
        try:
            code = await asyncio.wait_for(asyncio.shield(self._code), 5)
        except TimeoutError:
            code = None
        self.returncode = -1 if code is None else code
        return code

    def send_signal(self, sig: int) -> None:
        if self._pidfd is None or self._exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def _close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


class ForkServer:
    """The supervisor's handle on the zygote: launches it, asks it for workers, learns their
    exits. `launch()` may run before the supervisor's own imports and event loop (gateway/cli.py
    does), so the zygote's imports overlap them; `run()` then keeps it running (relaunched with
    backoff when it dies); `fork()` raises ForkServerUnavailable while it is down, so the node
    spawns workers meanwhile. `set_lock()` hands it the storage lock (SCM_RIGHTS: the same
    open file, so the same flock) before the first fork."""

    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._ready = False
        self._up: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[ForkedProcess]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def ready(self) -> bool:
        return self._ready

    def launch(self) -> None:
        """Start the zygote process (no event loop needed: it only forks and execs)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = [sys.executable, "-m", "gateway.forkserver", "--control-fd", str(theirs.fileno())]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        args += ["--title-room", "_" * TITLE_ROOM]
        try:
            self.proc = subprocess.Popen(
                args,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # pjsua2 prints its start-up lines there
                env={**os.environ, **THREAD_ENV},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._ready = False
        if self._lock_fd is not None:
            self._send_lock()

    def set_lock(self, fd: int) -> None:
        self._lock_fd = fd
        if self._sock is not None:
            self._send_lock()

    def _send_lock(self) -> None:
        assert self._sock is not None and self._lock_fd is not None
        with contextlib.suppress(OSError):  # a zygote already gone is relaunched with it
            socket.send_fds(self._sock, [b'{"op": "lock"}'], [self._lock_fd])

    async def run(self, start_timeout: float = 60.0) -> None:
        """Keep the zygote running until `stop()` (or cancellation)."""
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while not self._stopping:
            started = time.monotonic()
            code: int | None = None
            try:
                if self.proc is None:
                    self.launch()
                assert self.proc is not None and self._sock is not None
                self._up = loop.create_future()
                self._sock.setblocking(False)
                loop.add_reader(self._sock, self._readable)
                exited = asyncio.ensure_future(_exited(self.proc))
                try:
                    await asyncio.wait_for(asyncio.shield(self._up), start_timeout)
                    code = await exited
                finally:
                    if not exited.done():
                        self.proc.kill()
                        code = await exited
            except (OSError, TimeoutError, ForkServerUnavailable) as e:
                log.error("fork server: could not start: %s", e)
                if self.proc is not None and self.proc.poll() is None:
                    self.proc.kill()
                    code = await _exited(self.proc)
            finally:
                self._gone()
                self.proc = None
            if self._stopping:
                return
            self.restarts += 1
            log.error("fork server exited (%s); restarting (workers are spawned meanwhile)", code)
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10)
            await asyncio.sleep(backoff)

    def _readable(self) -> None:
        if self._sock is None:
            return
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, MAX_PACKET, 2)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._gone()
                return
            try:
                self._on_message(json.loads(data), fds)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                log.error("fork server: bad message %r: %s", data[:200], e)
                for fd in fds:
                    os.close(fd)

    def _on_message(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg["op"]
        if op == "ready":
            self._ready = True
            if self._up is not None and not self._up.done():
                self._up.set_result(None)
            log.info("fork server ready (pid %s)", msg.get("pid"))
        elif op == "forked":
            fut = self._pending.pop(msg["id"], None)
            proc = ForkedProcess(int(msg["pid"]), fds[0])
            self._children[proc.pid] = proc
            if fut is not None and not fut.done():
                fut.set_result(proc)
            else:  # nobody waits for it any more: it would find its IPC closed and exit
                proc.kill()
        elif op == "error":
            fut = self._pending.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_exception(ForkServerUnavailable(msg.get("error", "fork failed")))
        elif op == "exited":
            child = self._children.pop(int(msg["pid"]), None)
            if child is not None:
                child._reported(int(msg["code"]))

    def _gone(self) -> None:
        """The zygote's end closed: no fork will be answered, no exit reported."""
        self._ready = False
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._sock)
            self._sock.close()
            self._sock = None
        if self._up is not None and not self._up.done():
            self._up.set_exception(ForkServerUnavailable("the fork server exited while starting"))
            self._up.exception()  # retrieved: whoever waits gets it, nobody else warns
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ForkServerUnavailable("the fork server exited"))
        self._pending.clear()
        for child in self._children.values():
            child._reported(None)
        self._children.clear()

    async def fork(self, index: int, max_calls: int, ipc: socket.socket,
                   wait_ready: float = 60.0) -> ForkedProcess:
        """A new worker on `ipc` (the worker's end of its socketpair; the caller closes its
        copy). Waits for a zygote still starting; raises ForkServerUnavailable when none."""
        if not self._ready:
            up = self._up
            if up is None or up.done():
                raise ForkServerUnavailable("the fork server is not running")
            try:
                await asyncio.wait_for(asyncio.shield(up), wait_ready)
            except (TimeoutError, ForkServerUnavailable) as e:
                raise ForkServerUnavailable(f"the fork server did not start: {e}") from None
        sock = self._sock
        if sock is None:
            raise ForkServerUnavailable("the fork server is not running")
        rid = next(self._ids)
        fut: asyncio.Future[ForkedProcess] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        msg = json.dumps({"op": "fork", "id": rid, "index": index, "max_calls": max_calls})
        try:
            await _send_fds(sock, msg.encode(), [ipc.fileno()])
        except OSError as e:
            self._pending.pop(rid, None)
            raise ForkServerUnavailable(f"the fork server is not answering: {e}") from None
        try:
            return await asyncio.wait_for(fut, 10)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise ForkServerUnavailable("the fork server did not answer in 10 s") from None

    async def stop(self) -> None:
        """Stop the zygote (the workers it forked are the node's to stop)."""
        self._stopping = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # the zygote sees EOF and exits
        proc = self.proc
        if proc is not None:
            try:
                await asyncio.wait_for(_exited(proc), 5)
            except TimeoutError:
                proc.kill()
                await _exited(proc)
        self._gone()


async def _exited(proc: subprocess.Popen[bytes]) -> int:
    """Wait for `proc` to exit without blocking the loop (its pidfd reads ready then)."""
    if proc.poll() is not None:
        return proc.returncode
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(proc.pid)
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _set_done, done)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()


async def _send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(sock, [data], fds)
            return
        except (BlockingIOError, InterruptedError):
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock, _set_done, writable)
            try:
                await writable
            finally:
                loop.remove_writer(sock)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


if __name__ == "__main__":
    sys.exit(main())
