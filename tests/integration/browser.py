"""A real headless Chromium for the tests: the browser phone page driven over JSON lines.

`BrowserPhone.launch(mic_wav, log_path)` starts tests/browser/driver.mjs (playwright-core driving
Debian's /usr/bin/chromium, whose fake microphone loops `mic_wav`); `eval()` runs a JS
expression in the page (a promise is awaited), e.g. `await phone.eval("sautiPhone.state()")`;
`heard()` pulls the remote audio the page captured. `close()` always ends node and Chromium.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from tests.tones import Samples, sine, write_wav

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("SAUTI_CHROMIUM", "/usr/bin/chromium"))
DRIVER = ROOT / "tests" / "browser" / "driver.mjs"
NODE_MODULES = ROOT / "node_modules"
LAUNCH_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0


def skip_unless_browser() -> None:
    """pytest.skip unless Chromium, node and the npm packages (scripts/setup.sh) are there."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium; scripts/setup.sh)")
    if shutil.which("node") is None:
        pytest.skip("node missing (scripts/setup.sh installs nodejs)")
    for pkg in ("playwright-core", "jssip"):
        if not (NODE_MODULES / pkg).is_dir():
            pytest.skip(f"node_modules/{pkg} missing (run scripts/setup.sh: npm ci)")


def tone_wav(path: Path, freq: float, seconds: float = 5, rate: int = 48000) -> Path:
    """A 16-bit mono WAV of a steady sine at -10 dBFS (the fake microphone loops it). A whole
    number of cycles per file, so the loop has no click."""
    cycles = max(1, round(freq * seconds))
    n = round(cycles * rate / freq)
    write_wav(path, sine(freq, n / rate, rate, amp=10 ** (-10 / 20))[:n], rate)
    return path


class BrowserError(RuntimeError):
    """The page or the driver answered with an error."""


class BrowserPhone:
    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.version = ""
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._descendants: list[psutil.Process] = []

    @classmethod
    async def launch(cls, mic_wav: Path, log_path: Path) -> BrowserPhone:
        skip_unless_browser()
        proc = await asyncio.create_subprocess_exec(
            "node", str(DRIVER), "--mic", str(mic_wav), "--log", str(log_path),
            "--chromium", str(CHROMIUM),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT), start_new_session=True, limit=64 * 1024 * 1024)
        self = cls(proc, log_path)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), LAUNCH_TIMEOUT_S)
            if not line:
                raise BrowserError(f"driver exited at launch (see {log_path})")
            hello = json.loads(line)
            if not hello.get("ok"):
                raise BrowserError(f"Chromium did not start: {hello.get('error')}")
            self.version = str(hello["value"]["version"])
            self._remember_descendants()
            self._reader = asyncio.get_running_loop().create_task(self._read())
        except BaseException:
            await self.close()
            raise
        return self

    def _remember_descendants(self) -> None:
        """Chromium runs in its own process group (playwright detaches it): note the tree now,
        so close() can end it even if node is gone first."""
        with contextlib.suppress(psutil.Error):
            self._descendants = psutil.Process(self.proc.pid).children(recursive=True)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            fut = self._waiting.pop(msg.get("id"), None)
            if fut is None or fut.done():
                continue
            if msg.get("ok"):
                fut.set_result(msg.get("value"))
            else:
                fut.set_exception(BrowserError(str(msg.get("error"))))
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BrowserError(f"driver exited (see {self.log_path})"))
        self._waiting.clear()

    async def _request(self, op: str, timeout: float, **fields: Any) -> Any:
        if self.proc.returncode is not None or self.proc.stdin is None:
            raise BrowserError(f"driver not running (see {self.log_path})")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self.proc.stdin.write((json.dumps({"id": rid, "op": op, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"browser {op} {fields!r:.200} took over {timeout} s") from None
        finally:
            self._waiting.pop(rid, None)

    async def goto(self, url: str) -> Any:
        value = await self._request("goto", 20.0, url=url, timeout_ms=15000)
        self._remember_descendants()
        return value

    async def eval(self, expr: str, timeout: float = 15.0) -> Any:
        return await self._request("eval", timeout, expr=expr)

    async def heard(self) -> tuple[Samples, int]:
        """The remote audio the page captured since the session's media started: float64
        samples in [-1, 1) and their rate."""
        got = await self.eval("sautiPhone.heard()", timeout=30.0)
        pcm = base64.b64decode(got["b64"])
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0
        return x, int(got["rate"])

    async def close(self) -> None:
        """Close Chromium and node: politely (driver 'close'), then SIGTERM, then SIGKILL of
        node's process group and every process it started. Bounded by about 2 x CLOSE_TIMEOUT_S."""
        self._remember_descendants_safe()
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._request("close", CLOSE_TIMEOUT_S), CLOSE_TIMEOUT_S)
            with contextlib.suppress(Exception):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), CLOSE_TIMEOUT_S)
        for p in self._descendants:
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    def _remember_descendants_safe(self) -> None:
        if self.proc.returncode is None:
            self._remember_descendants()

    async def __aenter__(self) -> BrowserPhone:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
