"""Supervision on the internal API: the SDK's request and response shapes, one supervisor per
call, mode changes only once connected, idempotent create and delete, and the events each
transition emits. A real aiohttp server and record store; a fake legs backend stands in for
the node (placing the supervisor's leg is tested end to end in tests/integration)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.api import make_app
from gateway.calls.control import ControlError
from gateway.calls.identity import CallIdentity
from gateway.calls.links import LinkSigner
from gateway.calls.records import CallRecords
from gateway.supervision.registry import Supervision, Supervisions
from gateway.supervision.request import Mode
from tests.unit.test_api_calls import Api, Clock, FakeControl, serve, settings_for

CALL = "0190aaaa-0000-7000-8000-000000000001"
PHONE = {"mode": "listen", "supervisor": {"type": "phone", "number": "+254711000009"}}


class FakeLegs:
    def __init__(self) -> None:
        self.started: list[Supervision] = []
        self.modes: list[Mode] = []
        self.stopped: list[str] = []
        self.refuse: ControlError | None = None

    async def start(self, sup: Supervision) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.started.append(sup)

    async def set_mode(self, sup: Supervision, mode: Mode) -> None:
        self.modes.append(mode)

    async def stop(self, sup: Supervision) -> None:
        self.stopped.append(sup.supervision_id)


@pytest.fixture
async def sapi(tmp_path: Path) -> AsyncIterator[tuple[Api, Supervisions, FakeLegs, list[Any]]]:
    control = FakeControl()
    ident = CallIdentity(call_id=CALL, direction="inbound", from_="+254722000001",
                         to="+254700000001", number_id="n1", workspace_id="ws1",
                         created_at=time.time(), worker=0)
    control.live[CALL] = ident.summary("in-progress")
    records = await CallRecords.open(tmp_path / "calls.sqlite3")
    legs, events = FakeLegs(), []
    sups = Supervisions(legs, lambda sup, kind, data: events.append((kind, data)))
    clock = Clock()
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    app = make_app(settings_for(tmp_path), control, recordings, records=records,
                   links=LinkSigner(b"k" * 32, clock=clock), supervisions=sups)
    runner, base = await serve(app)
    async with aiohttp.ClientSession() as http:
        yield Api(base, http, control, records, clock, recordings, runner), sups, legs, events
    await runner.cleanup()
    await records.close()


async def test_start_shape_and_one_supervisor_per_call(sapi: Any) -> None:
    api, _sups, _legs, events = sapi
    status, body, _ = await api.req("POST", f"/v1/calls/{CALL}/supervision",
                                    json={**PHONE, "announce": "agent", "label": "QA"})
    assert status == 201, body
    assert body["call_id"] == CALL and body["mode"] == "listen" and body["announce"] == "agent"
    assert body["state"] == "connecting" and body["supervisor"] == PHONE["supervisor"]
    assert body["label"] == "QA" and body["notify_agent"] is False
    assert body["supervision_id"] and body["created_at"] and body["connected_at"] is None
    status, again, _ = await api.req("POST", f"/v1/calls/{CALL}/supervision", json=PHONE)
    assert status == 409 and again["error"]["code"] == "calls.supervision_in_progress"
    status, got, _ = await api.req("GET", f"/v1/calls/{CALL}/supervision")
    assert status == 200 and got["supervision"]["supervision_id"] == body["supervision_id"]
    assert events == []  # nothing connected yet


async def test_mode_changes_only_once_connected(sapi: Any) -> None:
    api, sups, legs, events = sapi
    _, body, _ = await api.req("POST", f"/v1/calls/{CALL}/supervision", json=PHONE)
    sid = body["supervision_id"]
    sups.ringing(sid)
    status, err, _ = await api.req("PATCH", f"/v1/calls/{CALL}/supervision",
                                   json={"mode": "whisper"})
    assert status == 409 and err["error"]["code"] == "calls.supervision_not_connected"
    sups.connected(sid)
    assert [k for k, _ in events] == ["call.supervision.started"]
    status, body, _ = await api.req("PATCH", f"/v1/calls/{CALL}/supervision",
                                    json={"mode": "whisper"})
    assert status == 200 and body["mode"] == "whisper" and body["state"] == "connected"
    assert legs.modes == ["whisper"]
    kind, data = events[-1]
    assert kind == "call.supervision.mode_changed" and data["previous_mode"] == "listen"
    status, err, _ = await api.req("PATCH", f"/v1/calls/{CALL}/supervision", json={"mode": "x"})
    assert status == 422 and "mode" in err["error"]["message"]


async def test_delete_is_idempotent_and_ends_once(sapi: Any) -> None:
    api, sups, legs, events = sapi
    _, body, _ = await api.req("POST", f"/v1/calls/{CALL}/supervision", json=PHONE)
    sups.connected(body["supervision_id"])
    for _ in range(2):
        status, got, _ = await api.req("DELETE", f"/v1/calls/{CALL}/supervision")
        assert status == 200 and got["state"] == "ended" and got["ended_at"]
    assert legs.stopped == [body["supervision_id"]]
    assert [k for k, _ in events] == ["call.supervision.started", "call.supervision.ended"]
    # a new supervisor may come once the first has ended
    status, _, _ = await api.req("POST", f"/v1/calls/{CALL}/supervision", json=PHONE)
    assert status == 201


async def test_unconnected_end_is_a_failure(sapi: Any) -> None:
    api, sups, _legs, events = sapi
    _, body, _ = await api.req("POST", f"/v1/calls/{CALL}/supervision", json=PHONE)
    sups.ended(body["supervision_id"], "busy")
    _, got, _ = await api.req("GET", f"/v1/calls/{CALL}/supervision")
    assert got["supervision"]["state"] == "failed" and got["supervision"]["reason"] == "busy"
    assert [k for k, _ in events] == ["call.supervision.failed"]


async def test_idempotency_key_replays_and_refuses_another_body(sapi: Any) -> None:
    api, _sups, legs, _events = sapi
    h = {"Idempotency-Key": "sup-1"}
    s1, b1, _ = await api.req("POST", f"/v1/calls/{CALL}/supervision", json=PHONE, headers=h)
    s2, b2, r2 = await api.req("POST", f"/v1/calls/{CALL}/supervision", json=PHONE, headers=h)
    assert s1 == s2 == 201 and b1 == b2 and r2.headers.get("Idempotent-Replayed") == "true"
    assert len(legs.started) == 1  # the replay placed nothing
    s3, b3, _ = await api.req("POST", f"/v1/calls/{CALL}/supervision",
                              json={**PHONE, "mode": "barge"}, headers=h)
    assert s3 == 409 and b3["error"]["code"] == "idempotency.conflict"


async def test_bad_requests_name_what_is_wrong(sapi: Any) -> None:
    api, sups, legs, _events = sapi
    url = f"/v1/calls/{CALL}/supervision"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mode": "spy", "supervisor": PHONE["supervisor"]}, "mode"),
        ({"mode": "listen"}, "supervisor"),
        ({"mode": "listen", "supervisor": {"type": "phone", "number": "12"}}, "supervisor"),
        ({"mode": "listen", "supervisor": {"type": "sip", "identity": "nohost"}}, "supervisor"),
        ({**PHONE, "label": "x" * 65}, "label"),
        ({**PHONE, "announce": "everyone"}, "announce"),
    ]
    for body, field in cases:
        status, err, _ = await api.req("POST", url, json=body)
        assert status == 422, body
        assert field in err["error"]["message"], (body, err)
    status, err, _ = await api.req(
        "POST", url, json={"mode": "listen", "supervisor": {"type": "client", "identity": "a"}})
    assert status == 422 and err["error"]["code"] == "supervision.client_unsupported"
    status, err, _ = await api.req("POST", "/v1/calls/nope/supervision", json=PHONE)
    assert status == 404 and err["error"]["code"] == "calls.not_found"
    legs.refuse = ControlError(409, "calls.not_bridged", "call is not bridged")
    status, err, _ = await api.req("POST", url, json=PHONE)
    assert status == 409 and err["error"]["code"] == "calls.not_bridged"
    assert sups.current(CALL) is None  # a refused start leaves nothing behind
    assert legs.started == []
