"""The internal API on a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import io
import re
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from config.settings import Settings
from gateway.api import make_app
from tests.call_control import StaticCalls

TOKEN = "api-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REC_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


class FakeRegistry(StaticCalls):
    def __init__(self) -> None:
        super().__init__(
            [
                {
                    "call_id": "call_1",
                    "direction": "inbound",
                    "from": "+254722000001",
                    "to": "+254700000001",
                    "number_id": "num_1",
                    "workspace_id": "ws_1",
                    "status": "in-progress",
                    "started_at": "2026-06-27T10:00:00.000Z",
                    "answered_at": "2026-06-27T10:00:02.000Z",
                    "worker": 0,
                }
            ]
        )


class Api:
    def __init__(self, base: str, http: aiohttp.ClientSession, recordings: Path) -> None:
        self.base = base
        self.http = http
        self.recordings = recordings

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        async with self.http.get(self.base + path, **kw) as resp:
            await resp.read()
            return resp


async def start_api(
    tmp_path: Path, demo: bool
) -> tuple[web.AppRunner, str, aiohttp.ClientSession, Path]:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    (tmp_path / "secret.wav").write_bytes(b"RIFF-not-a-recording")
    # The port must be known before the app is built (the demo document embeds it).
    probe = web.AppRunner(web.Application())
    await probe.setup()
    site = web.TCPSite(probe, "127.0.0.1", 0)
    await site.start()
    port = probe.addresses[0][1]
    await probe.cleanup()
    settings = Settings.model_validate(
        {
            "api": {"token": TOKEN, "listen": f"127.0.0.1:{port}"},
            "demo": {"enabled": demo},
            "callbacks": {"allow_http": True, "allow_private": True},
            "storage": {"dir": str(tmp_path)},
        }
    )
    runner = web.AppRunner(make_app(settings, FakeRegistry(), recordings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}", aiohttp.ClientSession(), recordings


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    runner, base, http, recordings = await start_api(tmp_path, demo=True)
    yield Api(base, http, recordings)
    await http.close()
    await runner.cleanup()


async def envelope(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status
    body = await resp.json()
    err = body["error"]
    assert err["code"] == code
    assert err["message"]
    assert re.fullmatch(r"req_[0-9a-f]{24}", err["request_id"])
    assert resp.headers["X-Request-Id"] == err["request_id"]
    return dict(err)


async def test_healthz_no_auth(api: Api) -> None:
    async with api.http.get(api.base + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
        assert resp.headers["X-Request-Id"].startswith("req_")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ],
)
async def test_calls_require_token(api: Api, headers: dict[str, str]) -> None:
    async with api.http.get(api.base + "/v1/calls", headers=headers) as resp:
        await envelope(resp, 401, "api_key.invalid")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_list_calls(api: Api) -> None:
    async with api.http.get(api.base + "/v1/calls", headers=AUTH) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {"data": FakeRegistry().calls, "next_cursor": None}


async def test_unknown_route_and_method(api: Api) -> None:
    async with api.http.get(api.base + "/nope") as resp:
        await envelope(resp, 404, "not_found")
    async with api.http.get(api.base + "/v1/nope", headers=AUTH) as resp:
        await envelope(resp, 404, "not_found")
    async with api.http.delete(api.base + "/v1/calls", headers=AUTH) as resp:
        await envelope(resp, 405, "method_not_allowed")
        assert "GET" in resp.headers["Allow"]
    async with api.http.post(api.base + "/healthz") as resp:
        await envelope(resp, 405, "method_not_allowed")


async def test_recording_served(api: Api) -> None:
    data = b"RIFF" + b"\0" * 100
    (api.recordings / f"{REC_ID}.wav").write_bytes(data)
    async with api.http.get(api.base + f"/v1/recordings/{REC_ID}", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "audio/wav"
        assert await resp.read() == data
    async with api.http.get(api.base + f"/v1/recordings/{REC_ID}") as resp:
        await envelope(resp, 401, "api_key.invalid")


async def test_recording_missing(api: Api) -> None:
    async with api.http.get(api.base + "/v1/recordings/0190aaaa-0000", headers=AUTH) as resp:
        await envelope(resp, 404, "calls.recording_not_found")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/recordings/..%2Fsecret",
        "/v1/recordings/%2E%2E%2Fsecret",
        "/v1/recordings/.hidden",
        "/v1/recordings/..%5Csecret",
        "/v1/recordings/a.b",
    ],
)
async def test_recording_traversal_refused(api: Api, path: str) -> None:
    url = URL(api.base + path, encoded=True)
    async with api.http.get(url, headers=AUTH) as resp:
        assert resp.status in (400, 404)
        body = await resp.json()
        assert body["error"]["code"] in ("validation.bad_request", "not_found")
        assert b"RIFF-not-a-recording" not in await resp.read()


async def test_demo_document_and_chime(api: Api) -> None:
    for method in ("POST", "GET"):
        async with api.http.request(method, api.base + "/demo/voice", data=None) as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc == {
        "actions": [
            {
                "say": {
                    "text": "Welcome to Sautikit. Karibu.",
                    "voice": "alice",
                    "language": "en-KE",
                }
            },
            {"play": {"url": f"{api.base}/demo/chime.wav"}},
            {"hangup": {}},
        ]
    }
    async with api.http.get(doc["actions"][1]["play"]["url"]) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "audio/wav"
        raw = await resp.read()
    with wave.open(io.BytesIO(raw)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        assert 0.5 <= w.getnframes() / w.getframerate() <= 0.7


async def test_demo_disabled(tmp_path: Path) -> None:
    runner, base, http, _ = await start_api(tmp_path, demo=False)
    try:
        async with http.get(base + "/demo/voice") as resp:
            await envelope(resp, 404, "not_found")
    finally:
        await http.close()
        await runner.cleanup()


async def test_internal_error_envelope(tmp_path: Path) -> None:
    class Broken(StaticCalls):
        def live_calls(self) -> list[dict[str, Any]]:
            raise RuntimeError("registry exploded")

    settings = Settings.model_validate({"api": {"token": TOKEN}, "storage": {"dir": str(tmp_path)}})
    runner = web.AppRunner(make_app(settings, Broken(), tmp_path), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(base + "/v1/calls", headers=AUTH) as resp,
        ):
            err = await envelope(resp, 500, "internal_error")
            assert "exploded" not in err["message"]
    finally:
        await runner.cleanup()
