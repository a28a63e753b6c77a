"""The conferences API on a registry of fake workers: list, read, mute/hold, kick, end, names
per workspace, the error envelope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.api.conferences import setup_conferences
from gateway.api.errors import error_middleware
from gateway.control.room_join import RoomJoin
from gateway.rooms.registry import RoomRegistry
from tests.unit.test_room_registry import FakeWorker

Client = tuple[TestClient[Any, Any], RoomRegistry, dict[int, FakeWorker]]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    workers = {i: FakeWorker(i) for i in range(3)}
    reg = RoomRegistry(lambda i: workers.get(i))  # type: ignore[arg-type,return-value]
    app = web.Application(middlewares=[error_middleware])
    setup_conferences(app, reg)
    async with TestClient(TestServer(app)) as c:
        yield c, reg, workers


async def test_list_read_mute_hold_kick_end(client) -> None:
    c, reg, ws = client
    await reg.on_join(0, RoomJoin(call_id="a", workspace_id="ws_1", name="sales"))
    await reg.on_join(1, RoomJoin(call_id="b", workspace_id="ws_1", name="sales", muted=True))
    r = await c.get("/v1/conferences")
    body = await r.json()
    assert r.status == 200 and [x["name"] for x in body["data"]] == ["sales"]
    assert body["data"][0]["participant_count"] == 2
    r = await c.get("/v1/conferences/sales")
    conf = (await r.json())["conference"]
    assert [(p["call_id"], p["muted"], p["hold"]) for p in conf["participants"]] == [
        ("a", False, False), ("b", True, False)]
    assert conf["participants"][0]["joined_at"].endswith("Z") and conf["hub_worker"] == 0

    r = await c.post("/v1/conferences/sales/participants/a", json={"muted": True, "hold": True})
    assert r.status == 200 and (await r.json())["participant"]["hold"] is True
    assert [(m.muted, m.hold) for m in ws[0].last.members] == [(True, True)]
    r = await c.post("/v1/conferences/sales/participants/a", json={"muted": "yes"})
    assert r.status == 422 and (await r.json())["error"]["code"] == "validation.bad_request"
    r = await c.post("/v1/conferences/sales/participants/a", json={"volume": 3})
    assert r.status == 422

    r = await c.delete("/v1/conferences/sales/participants/b")
    assert r.status == 200 and ws[1].last.removed == {"b": "kicked"}
    r = await c.delete("/v1/conferences/sales/participants/b")
    err = (await r.json())["error"]
    assert r.status == 404 and err["code"] == "conferences.participant_not_found"

    r = await c.delete("/v1/conferences/sales")
    assert r.status == 200 and (await r.json())["participants"] == 1
    assert ws[0].last.ended and ws[0].last.removed == {"a": "ended"}
    r = await c.get("/v1/conferences/sales")
    assert r.status == 404 and (await r.json())["error"]["code"] == "conferences.not_found"


async def test_a_name_in_two_workspaces_needs_workspace_id(client) -> None:
    c, reg, _ = client
    await reg.on_join(0, RoomJoin(call_id="a", workspace_id="ws_1", name="x"))
    await reg.on_join(1, RoomJoin(call_id="b", workspace_id="ws_2", name="x"))
    r = await c.get("/v1/conferences/x")
    body = await r.json()
    assert r.status == 409 and body["error"]["code"] == "conferences.ambiguous_name"
    assert body["error"]["workspaces"] == ["ws_1", "ws_2"]
    r = await c.get("/v1/conferences/x", params={"workspace_id": "ws_2"})
    assert [p["call_id"] for p in (await r.json())["conference"]["participants"]] == ["b"]
    r = await c.get("/v1/conferences", params={"workspace_id": "ws_1"})
    assert [x["workspace_id"] for x in (await r.json())["data"]] == ["ws_1"]
    r = await c.delete("/v1/conferences/x/participants/a", params={"workspace_id": "ws_1"})
    assert r.status == 200
