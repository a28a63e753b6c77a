"""/metrics, /admin/drain and /healthz's drain state, on a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from config.settings import Settings
from gateway.api import make_app
from gateway.api.admin import NodeControl
from gateway.metrics import NodeMetrics
from tests.call_control import StaticCalls
from tests.unit.test_metrics import check_histogram, parse

pytestmark = pytest.mark.integration

TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeNode(StaticCalls):
    """A NodeControl: calls are a plain list; the metrics are the real NodeMetrics over it."""

    def __init__(self, active: int = 2) -> None:
        self.calls: list[dict[str, Any]] = [
            {"call_id": f"call_{i}", "direction": "inbound", "worker": i % 2} for i in range(active)
        ]
        self._draining = False
        self.drain_started = asyncio.Event()
        self.drain_calls = 0
        self.undrain_calls = 0
        self.metrics = NodeMetrics(
            calls=lambda: self.calls,
            workers=lambda: [(0, True), (1, True)],
            outbox_counts=lambda: {"pending": 1, "delivered": 5, "dead_letter": 0},
        )

    def active_calls(self) -> list[dict[str, Any]]:
        return self.calls

    def metrics_text(self) -> str:
        return self.metrics.render()

    async def refresh_metrics(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    @property
    def draining(self) -> bool:
        return self._draining

    def unready_reason(self) -> str | None:
        return "draining" if self._draining else None

    async def drain(self) -> None:
        self.drain_calls += 1
        self._draining = True
        self.drain_started.set()
        self.metrics.set_draining(True)

    async def undrain(self) -> None:
        self.undrain_calls += 1
        self._draining = False
        self.metrics.set_draining(False)

    def active_call_count(self) -> int:
        return len(self.calls)


def _typecheck(node: FakeNode) -> NodeControl:
    return node  # mypy: FakeNode satisfies the Protocol


@dataclass
class Api:
    base: str
    http: aiohttp.ClientSession
    node: FakeNode

    async def call(
        self, method: str, path: str, *, auth: bool = True, **kw: Any
    ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        headers = AUTH if auth else {}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as resp:
            body = await resp.json()
            return resp.status, body, resp


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _settings(storage: Path) -> Settings:
    return Settings.model_validate({"api": {"token": TOKEN}, "storage": {"dir": str(storage)}})


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    node = FakeNode(active=2)
    runner, base = await _serve(make_app(_settings(tmp_path), node, tmp_path, node=node))
    async with aiohttp.ClientSession() as http:
        yield Api(base, http, node)
    await runner.cleanup()


def assert_envelope(status: int, body: dict[str, Any], want_status: int, code: str) -> None:
    assert status == want_status, body
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert re.fullmatch(r"req_[0-9a-f]{24}", body["error"]["request_id"])


async def test_metrics_open_and_in_prometheus_text_format(api: Api) -> None:
    api.node.metrics.observe({"t": "final", "status": "completed"})
    api.node.metrics.observe({"t": "metric", "name": "setup_seconds", "value": 0.012})
    async with api.http.get(api.base + "/metrics") as resp:  # no token
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert resp.headers["X-Request-Id"].startswith("req_")
        text = await resp.text()
    fams = parse(text)
    assert fams["sautikit_calls_total"].get(status="completed") == 1
    assert fams["sautikit_active_calls"].get(direction="inbound", worker="0") == 1
    assert fams["sautikit_active_calls"].get(direction="inbound", worker="1") == 1
    assert fams["sautikit_events_outbox"].get(state="pending") == 1
    assert fams["sautikit_workers"].get(state="ready") == 2
    assert fams["sautikit_draining"].get() == 0
    check_histogram(fams["sautikit_call_setup_seconds"])
    assert fams["sautikit_call_setup_seconds"].get("_bucket", le="0.025") == 1
    # A token is harmless, and HEAD works for probes.
    async with api.http.get(api.base + "/metrics", headers=AUTH) as resp:
        assert resp.status == 200
    async with api.http.head(api.base + "/metrics") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}]
)
async def test_admin_needs_token(api: Api, method: str, headers: dict[str, str]) -> None:
    async with api.http.request(method, api.base + "/admin/drain", headers=headers) as resp:
        assert_envelope(resp.status, await resp.json(), 401, "api_key.invalid")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.node.drain_calls == 0 and api.node.undrain_calls == 0
    assert not api.node.draining


async def test_drain_status_undrain_and_healthz(api: Api) -> None:
    status, body, _ = await api.call("GET", "/healthz", auth=False)
    assert (status, body) == (
        200, {"status": "ok", "ready": True, "draining": False, "accepting_calls": True})

    status, body, _ = await api.call("POST", "/admin/drain")
    assert (status, body) == (202, {"draining": True, "active_calls": 2})
    assert api.node.draining and api.node.drain_calls == 1

    # Healthy while draining: still 200 "ok", but not taking calls.
    status, body, _ = await api.call("GET", "/healthz", auth=False)
    assert (status, body) == (
        200, {"status": "ok", "ready": True, "draining": True, "accepting_calls": False})
    status, body, _ = await api.call("GET", "/admin/drain")
    assert (status, body) == (200, {"draining": True, "active_calls": 2, "drained": False})
    async with api.http.get(api.base + "/metrics") as resp:
        assert parse(await resp.text())["sautikit_draining"].get() == 1

    # Draining again is harmless.
    status, body, _ = await api.call("POST", "/admin/drain")
    assert (status, body) == (202, {"draining": True, "active_calls": 2})

    api.node.calls.clear()
    status, body, _ = await api.call("GET", "/admin/drain")
    assert body == {"draining": True, "active_calls": 0, "drained": True}

    status, body, _ = await api.call("DELETE", "/admin/drain")
    assert (status, body) == (200, {"draining": False, "active_calls": 0})
    assert not api.node.draining and api.node.undrain_calls == 1
    status, body, _ = await api.call("GET", "/healthz", auth=False)
    assert body == {"status": "ok", "ready": True, "draining": False, "accepting_calls": True}
    status, body, _ = await api.call("GET", "/admin/drain")
    assert body == {"draining": False, "active_calls": 0, "drained": False}


async def test_drain_wait_returns_when_calls_reach_zero(api: Api) -> None:
    async def calls_end() -> None:
        await api.node.drain_started.wait()  # the request has started the drain
        await asyncio.sleep(0.3)
        api.node.calls.pop()
        await asyncio.sleep(0.3)
        api.node.calls.pop()

    ender = asyncio.create_task(calls_end())
    t0 = time.monotonic()
    status, body, _ = await api.call("POST", "/admin/drain?wait=10")
    elapsed = time.monotonic() - t0
    await ender
    assert (status, body) == (200, {"draining": True, "active_calls": 0, "drained": True})
    assert 0.55 <= elapsed < 3, elapsed  # waited for the last call, not for the full 10 s


async def test_drain_wait_times_out_with_calls_left(api: Api) -> None:
    t0 = time.monotonic()
    status, body, _ = await api.call("POST", "/admin/drain?wait=0.4")
    elapsed = time.monotonic() - t0
    assert (status, body) == (202, {"draining": True, "active_calls": 2, "drained": False})
    assert 0.35 <= elapsed < 2, elapsed
    assert api.node.draining  # the drain stays on after the wait


async def test_drain_wait_zero_and_already_idle(api: Api) -> None:
    status, body, _ = await api.call("POST", "/admin/drain?wait=0")
    assert (status, body) == (202, {"draining": True, "active_calls": 2, "drained": False})
    api.node.calls.clear()
    status, body, _ = await api.call("POST", "/admin/drain?wait=3600")
    assert (status, body) == (200, {"draining": True, "active_calls": 0, "drained": True})


async def test_undrain_ends_a_waiting_drain(api: Api) -> None:
    async def undrain_soon() -> None:
        await api.node.drain_started.wait()
        await asyncio.sleep(0.2)
        status, _, _ = await api.call("DELETE", "/admin/drain")
        assert status == 200

    other = asyncio.create_task(undrain_soon())
    t0 = time.monotonic()
    status, body, _ = await api.call("POST", "/admin/drain?wait=30")
    await other
    assert time.monotonic() - t0 < 5
    assert (status, body) == (202, {"draining": False, "active_calls": 2, "drained": False})


@pytest.mark.parametrize(
    "query",
    [
        "wait=-1",
        "wait=abc",
        "wait=3600.5",
        "wait=3601",
        "wait=nan",
        "wait=inf",
        "wait=1e3",
        "wait=",
        "wait=%201",
        "wait=1&wait=2",
    ],
)
async def test_drain_bad_wait_refused_without_draining(api: Api, query: str) -> None:
    status, body, _ = await api.call("POST", f"/admin/drain?{query}")
    assert_envelope(status, body, 400, "validation.bad_request")
    assert "wait" in body["error"]["message"]
    assert api.node.drain_calls == 0 and not api.node.draining


async def test_unknown_admin_route_and_method(api: Api) -> None:
    status, body, _ = await api.call("GET", "/admin/nope")
    assert_envelope(status, body, 404, "not_found")
    status, body, _ = await api.call("GET", "/admin/nope", auth=False)
    assert_envelope(status, body, 401, "api_key.invalid")  # /admin/* is behind the token
    status, body, resp = await api.call("PUT", "/admin/drain")
    assert_envelope(status, body, 405, "method_not_allowed")
    assert {"GET", "POST", "DELETE"} <= set(re.split(r",\s*", resp.headers["Allow"]))
    status, body, _ = await api.call("POST", "/metrics", auth=False)
    assert_envelope(status, body, 405, "method_not_allowed")


async def test_metrics_failure_is_an_enveloped_500(tmp_path: Path) -> None:
    class Broken(FakeNode):
        def metrics_text(self) -> str:
            raise RuntimeError("registry exploded")

    node = Broken()
    runner, base = await _serve(make_app(_settings(tmp_path), node, tmp_path, node=node))
    try:
        async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as resp:
            body = await resp.json()
            assert_envelope(resp.status, body, 500, "internal_error")
            assert "exploded" not in body["error"]["message"]
    finally:
        await runner.cleanup()


async def test_without_node_no_metrics_no_admin_plain_healthz(tmp_path: Path) -> None:
    node = FakeNode()
    runner, base = await _serve(make_app(_settings(tmp_path), node, tmp_path))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as resp:
                assert await resp.json() == {"status": "ok"}
            async with http.get(base + "/metrics") as resp:
                assert_envelope(resp.status, await resp.json(), 404, "not_found")
            async with http.post(base + "/admin/drain", headers=AUTH) as resp:
                assert_envelope(resp.status, await resp.json(), 404, "not_found")
    finally:
        await runner.cleanup()
