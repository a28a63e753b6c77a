from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from config.settings import Settings
from gateway.routing import Route, Router, RoutingError, normalise_e164


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+254722000001", "+254722000001"),
        ("254722000001", "+254722000001"),
        ("0722000001", "+254722000001"),
        ("00254722000001", "+254722000001"),
        ("722000001", "+254722000001"),  # bare national significant number
        ("+254 722-000-001", "+254722000001"),
        ("(0722) 000.001", "+254722000001"),
        ("tel:+254722000001", "+254722000001"),
        ("tel:+254722000001;phone-context=example.com", "+254722000001"),
        ("sip:0722000001@carrier.example", "+254722000001"),
        ("%2B254722000001", "+254722000001"),
        ("+14155550123", "+14155550123"),
        ("0014155550123", "+14155550123"),
        ("+442079460000", "+442079460000"),
        ("+1234567", None),  # 7 digits: too short
        ("+1234567890123456", None),  # 16 digits: too long
        ("+0722000001", None),  # country codes never start with 0
        ("", None),
        ("anonymous", None),
        ("*100#", None),
        ("+2547x2000001", None),
        ("+２５４７２２０００００１", None),  # full-width digits are not ASCII
    ],
)
def test_normalise_e164(raw: str, expected: str | None) -> None:
    assert normalise_e164(raw) == expected


def test_normalise_other_region() -> None:
    assert normalise_e164("0201234567", region="DE") == "+49201234567"


SECRET = "cp-secret"


def settings(**over: Any) -> Settings:
    data: dict[str, Any] = {
        "api": {"token": "t", "listen": "127.0.0.1:8089"},
        "callbacks": {"allow_http": True, "allow_private": True},
        "numbers": [
            {
                "e164": "+254700000001",
                "number_id": "num_1",
                "workspace_id": "ws_1",
                "voice_callback_url": "https://voice.example.com/v",
                "callback_body": "json",
                "webhook_secret": "whsec_1",
            }
        ],
    }
    data.update(over)
    return Settings.model_validate(data)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_table_first(session: aiohttp.ClientSession) -> None:
    router = Router(settings(demo={"enabled": True}), session)
    route = await router.resolve("+254700000001", "+254722000001")
    assert route is not None
    assert (route.number_id, route.workspace_id, route.callback_body) == ("num_1", "ws_1", "json")
    assert route.webhook_secret == "whsec_1"
    assert "whsec_1" not in repr(route)


async def test_demo_fallback_and_none(session: aiohttp.ClientSession) -> None:
    route = await Router(settings(demo={"enabled": True}), session).resolve("+254711", "x")
    assert route == Route(
        e164="+254711",
        number_id="demo",
        workspace_id="demo",
        voice_callback_url="http://127.0.0.1:8089/demo/voice",
        source="demo",
    )
    assert route.events_url is None
    assert await Router(settings(), session).resolve("+254799999999", "x") is None


ControlPlane = Callable[[Callable[[web.Request], Any]], Any]


@pytest.fixture
async def control_plane() -> AsyncIterator[Callable[[Any], Any]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Any) -> str:
        app = web.Application()
        app.router.add_post("/resolve", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/resolve"

    yield start
    for r in runners:
        await r.cleanup()


def verify(body: bytes, header: str) -> None:
    parts = dict(p.split("=", 1) for p in header.split(","))
    expected = hmac.new(
        SECRET.encode(), body + b"." + parts["t"].encode(), hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)


async def test_control_plane_resolve(session: aiohttp.ClientSession, control_plane: Any) -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        raw = await request.read()
        verify(raw, request.headers["X-Sautikit-Signature"])
        doc = json.loads(raw)
        seen.append(doc)
        if doc["to"] != "+254733000001":
            return web.json_response({"error": {"code": "numbers.not_found"}}, status=404)
        return web.json_response(
            {
                "number_id": "num_cp",
                "workspace_id": "ws_cp",
                "voice_callback_url": "https://app.example.com/voice",
                "voice_callback_method": "GET",
                "events_url": "https://app.example.com/events",
                "webhook_secret": "whsec_cp",
                "status": "active",  # extra fields from the control plane are ignored
            }
        )

    url = await control_plane(handler)
    s = settings(control_plane={"resolve_url": url, "secret": SECRET}, demo={"enabled": True})
    router = Router(s, session)
    route = await router.resolve("+254733000001", "+254722000001")
    assert route is not None and route.source == "control_plane"
    assert route.e164 == "+254733000001"
    assert route.voice_callback_method == "GET" and route.webhook_secret == "whsec_cp"
    assert seen[0] == {"to": "+254733000001", "from": "+254722000001"}
    # 404 → None, and the demo is not a fallback once a control plane is configured.
    assert await router.resolve("+254733999999", "x") is None
    # The static table still wins without asking the control plane.
    assert (await router.resolve("+254700000001", "x")) is not None
    assert len(seen) == 2


@pytest.mark.parametrize(
    "reply",
    [
        web.Response(status=500, text="boom"),
        web.Response(status=200, text="not json"),
        web.json_response({"number_id": "x"}),  # missing fields
    ],
)
async def test_control_plane_errors(
    session: aiohttp.ClientSession, control_plane: Any, reply: web.Response
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply

    url = await control_plane(handler)
    router = Router(settings(control_plane={"resolve_url": url, "secret": SECRET}), session)
    with pytest.raises(RoutingError):
        await router.resolve("+254733000001", "x")


async def test_control_plane_unreachable(session: aiohttp.ClientSession) -> None:
    # Port 9 (discard) on loopback: nothing listens there in the test environment.
    s = settings(control_plane={"resolve_url": "http://127.0.0.1:9/r", "secret": SECRET})
    with pytest.raises(RoutingError):
        await Router(s, session, timeout_s=2).resolve("+254733000001", "x")
