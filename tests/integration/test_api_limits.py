"""The internal API under stalled connections: half-sent requests and silent sockets are closed
after `api.idle_timeout_s`, past `api.max_connections` new ones are closed at once, and a normal
request still succeeds meanwhile. Real aiohttp server and raw TCP sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from config.settings import Settings
from gateway.api.app import make_app, start_api
from gateway.demo import free_port
from tests.call_control import StaticCalls

pytestmark = pytest.mark.integration
STALLED = 200  # well under `ulimit -n`; loopback only


class NoCalls(StaticCalls):
    pass


async def serve(tmp_path, **api: Any) -> AsyncIterator[str]:
    port = free_port()
    settings = Settings.model_validate(
        {"api": {"token": "t" * 16, "listen": f"127.0.0.1:{port}", **api},
         "storage": {"dir": str(tmp_path)}})
    runner = await start_api(make_app(settings, NoCalls(), tmp_path), settings)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def open_stalled(addr: str, n: int, partial: bytes) -> list[tuple[Any, Any]]:
    host, port = addr.split(":")
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, int(port))
        if partial:
            writer.write(partial)
            await writer.drain()
        conns.append((reader, writer))
    return conns


async def closed_within(conns: list[tuple[Any, Any]], seconds: float) -> int:
    """How many of `conns` the server closed (EOF or reset) within `seconds`."""

    async def one(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1024), seconds) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    results = await asyncio.gather(*(one(r) for r, _ in conns))
    return sum(results)


async def healthz(addr: str) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        async with http.get(f"http://{addr}/healthz") as r:
            return r.status


def close_all(conns: list[tuple[Any, Any]]) -> None:
    for _, w in conns:
        w.close()


async def test_stalled_connections_time_out_while_requests_succeed(tmp_path) -> None:
    async for addr in serve(tmp_path, idle_timeout_s=1.5):
        half = await open_stalled(addr, STALLED // 2, b"GET /healthz HTTP/1.1\r\nHost: x")
        silent = await open_stalled(addr, STALLED // 2, b"")
        t0 = time.monotonic()
        try:
            assert await healthz(addr) == 200, "a normal request is served meanwhile"
            closed = await closed_within(half + silent, 4.0)
            elapsed = time.monotonic() - t0
            assert closed == STALLED, f"{closed} of {STALLED} closed in {elapsed:.1f}s"
            assert await healthz(addr) == 200
        finally:
            close_all(half + silent)


async def test_connections_past_the_cap_are_closed_at_once(tmp_path) -> None:
    async for addr in serve(tmp_path, idle_timeout_s=2, max_connections=20):
        held = await open_stalled(addr, 20, b"GET / HTTP/1.1\r\n")
        extra = await open_stalled(addr, 5, b"")
        try:
            assert await closed_within(extra, 1.0) == 5, "the cap closes new connections"
            close_all(held)
            await asyncio.sleep(0.2)
            assert await healthz(addr) == 200, "below the cap again: served"
        finally:
            close_all(held + extra)
