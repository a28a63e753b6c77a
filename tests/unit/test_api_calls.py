"""The calls API over HTTP: a real aiohttp server on 127.0.0.1, the real record store (SQLite in
tmp_path) and signed links, and a fake `CallControl` standing in for the node (the end-to-end
tests with SIP live in tests/integration)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from config.settings import Settings
from gateway.api import make_app
from gateway.calls.control import (
    CALLS_NOT_FOUND,
    CAPACITY,
    NUMBERS_NOT_FOUND,
    ControlError,
    OutboundCall,
)
from gateway.calls.identity import CallIdentity
from gateway.calls.links import LinkSigner
from gateway.calls.records import CallRecords
from gateway.control.hangup import Hangup
from gateway.control.redirect import Redirect
from gateway.control.respond import Respond

TOKEN = "calls-api-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FROM, TO = "+254700000001", "+254722000001"
QUICKSTART = {"to": TO, "from": FROM, "voice_callback_url": "https://app.example/voice"}


class FakeControl:
    """The node's side of the contract, in memory."""

    def __init__(self) -> None:
        self.placed: list[OutboundCall] = []
        self.commands: list[Hangup | Redirect | Respond] = []
        self.live: dict[str, dict[str, Any]] = {}
        self.fail: dict[str, ControlError] = {}  # by destination
        self.hold: asyncio.Event | None = None  # originate waits for it when set
        self.originating = asyncio.Event()  # set by the first originate

    async def originate(self, call: OutboundCall) -> dict[str, Any]:
        self.placed.append(call)
        self.originating.set()
        if self.hold is not None:
            await self.hold.wait()
        if call.to in self.fail:
            raise self.fail[call.to]
        ident = CallIdentity(
            call_id=call.call_id,
            direction="outbound",
            from_=call.from_,
            to=call.to,
            number_id="num_1",
            workspace_id="ws_1",
            created_at=time.time(),
            client_request_id=call.client_request_id,
            session_id=call.session_id,
            worker=0,
        )
        summary = ident.summary("ringing")
        self.live[call.call_id] = summary
        return summary

    async def command(self, op: Hangup | Redirect | Respond) -> dict[str, Any]:
        if op.call_id not in self.live:
            raise ControlError(404, CALLS_NOT_FOUND, f"no live call {op.call_id}")
        self.commands.append(op)
        if isinstance(op, Hangup):
            self.live.pop(op.call_id)
        return {"ok": True}

    def live_call(self, call_id: str) -> dict[str, Any] | None:
        return self.live.get(call_id)

    def live_calls(self) -> list[dict[str, Any]]:
        return list(self.live.values())


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    base: str
    http: aiohttp.ClientSession
    control: FakeControl
    records: CallRecords
    clock: Clock
    recordings: Path
    runner: web.AppRunner
    extra: list[Any] = field(default_factory=list)

    async def req(
        self, method: str, path: str, *, auth: bool = True, **kw: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = {**(AUTH if auth else {}), **kw.pop("headers", {})}
        async with self.http.request(
            method, self.base + path, headers=headers, allow_redirects=False, **kw
        ) as resp:
            body = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, body, resp


def settings_for(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "api": {"token": TOKEN},
            "storage": {"dir": str(tmp_path)},
            "callbacks": {"allow_http": True},
            "outbound": {"ring_timeout_s": 20},
        }
    )


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    control = FakeControl()
    records = await CallRecords.open(tmp_path / "calls.sqlite3")
    clock = Clock()
    links = LinkSigner(b"k" * 32, clock=clock)
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    app = make_app(settings_for(tmp_path), control, recordings, records=records, links=links)
    runner, base = await serve(app)
    async with aiohttp.ClientSession() as http:
        yield Api(base, http, control, records, clock, recordings, runner)
    await runner.cleanup()
    await records.close()


def error(body: dict[str, Any], code: str) -> dict[str, Any]:
    err = body["error"]
    assert err["code"] == code, err
    assert err["message"] and err["request_id"].startswith("req_")
    return dict(err)


def stored(i: int, status: str, direction: str = "outbound", **kw: Any) -> dict[str, Any]:
    return {
        "call_id": f"old{i}",
        "id": f"old{i}",
        "direction": direction,
        "status": status,
        "from": FROM,
        "to": TO,
        "started_at": f"2026-06-27T10:00:{i:02d}.000Z",
        **kw,
    }


# -- create ----------------------------------------------------------------------------------


async def test_quickstart_originate(api: Api) -> None:
    status, body, _ = await api.req("POST", "/v1/calls/originate", json=QUICKSTART)
    assert status == 201, body
    (call,) = api.control.placed
    assert body == {
        "call_id": call.call_id,
        "id": call.call_id,
        "session_id": call.call_id,
        "status": "ringing",
        "direction": "outbound",
        "to": TO,
        "from": FROM,
        "created_at": body["created_at"],
    }
    assert body["created_at"].endswith("Z")
    assert (call.timeout_s, call.voice_callback_url) == (20, "https://app.example/voice")
    await api.records.flush()
    rec = await api.records.get(call.call_id)
    assert rec is not None and rec["status"] == "ringing"


async def test_sdk_create_with_list_and_partial_failure(api: Api) -> None:
    api.control.fail["+254722000002"] = ControlError(503, CAPACITY, "no free slot", 3)
    body_in = {
        "from": FROM,
        "to": ["0722000001", "+254722000002", "+254722000003"],
        "client_request_id": "crm-42",
        "control": "mcp",
        "opening_actions": [{"say": {"text": "Hi"}}],
        "brand_new_sdk_field": 1,
    }
    status, body, _ = await api.req("POST", "/v1/calls", json=body_in)
    assert status == 422 and error(body, "validation.bad_request")["errors"] == [
        {"path": "control", "message": 'control: "mcp" needs [control_plane] control_url set'}
    ]
    del body_in["control"], body_in["opening_actions"]
    status, body, _ = await api.req("POST", "/v1/calls", json=body_in)
    assert status == 201, body
    calls = body["calls"]
    assert [c["to"] for c in calls] == ["+254722000001", "+254722000002", "+254722000003"]
    assert [c["status"] for c in calls] == ["ringing", "failed", "ringing"]
    assert calls[1]["error"] == {
        "code": "calls.capacity",
        "message": "no free slot",
        "retry_after_seconds": 3,
    }
    assert all(c["client_request_id"] == "crm-42" for c in calls)
    assert body["call_id"] == calls[0]["call_id"] and body["ignored_fields"] == [
        "brand_new_sdk_field"
    ]
    assert len({c["call_id"] for c in calls}) == 3


async def test_capacity_503_has_retry_after(api: Api) -> None:
    api.control.fail[TO] = ControlError(503, CAPACITY, "all workers busy", 4)
    status, body, resp = await api.req("POST", "/v1/calls", json=QUICKSTART)
    assert status == 503 and resp.headers["Retry-After"] == "4"
    assert error(body, "calls.capacity")["retry_after_seconds"] == 4


async def test_create_422_names_the_field(api: Api) -> None:
    cases = [
        ({**QUICKSTART, "to": [TO, "not-a-number"]}, "to[1]"),
        ({**QUICKSTART, "client_request_id": "a b"}, "client_request_id"),
        ({"to": TO, "from": FROM, "actions": [{"say": {"text": 1}}]}, "actions[0].say.text"),
    ]
    for body_in, path in cases:
        status, body, _ = await api.req("POST", "/v1/calls", json=body_in)
        assert status == 422
        err = error(body, "validation.bad_request")
        assert err["errors"][0]["path"] == path and path in err["message"]
    status, body, _ = await api.req("POST", "/v1/calls", data=b"{not json")
    assert status == 422 and "JSON" in error(body, "validation.bad_request")["message"]
    status, body, _ = await api.req("POST", "/v1/calls", data=b"[" * 100 + b"]" * 100)
    assert status == 422
    assert api.control.placed == []


async def test_create_422_says_why_a_number_is_refused(api: Api) -> None:
    for to, why in (("0722", "too short for KE"), ("0822000001", "not a valid number for KE"),
                    ("+999123456789", "invalid country code")):
        status, body, _ = await api.req("POST", "/v1/calls", json={**QUICKSTART, "to": to})
        assert status == 422
        err = error(body, "validation.bad_request")
        assert err["errors"][0]["path"] == "to" and f"({why})" in err["errors"][0]["message"]
    assert api.control.placed == []


async def test_create_needs_token(api: Api) -> None:
    status, body, _ = await api.req("POST", "/v1/calls", json=QUICKSTART, auth=False)
    assert status == 401 and error(body, "api_key.invalid")
    assert api.control.placed == []


async def test_call_id_of_a_known_call_is_refused(api: Api) -> None:
    status, _, _ = await api.req("POST", "/v1/calls", json={**QUICKSTART, "call_id": "cp-1"})
    assert status == 201
    status, body, _ = await api.req("POST", "/v1/calls", json={**QUICKSTART, "call_id": "cp-1"})
    assert status == 409 and error(body, "calls.already_exists")
    assert len(api.control.placed) == 1


# -- idempotency -------------------------------------------------------------------------------


async def test_idempotent_replay_and_conflict(api: Api) -> None:
    key = {"Idempotency-Key": "k-1"}
    s1, b1, _ = await api.req("POST", "/v1/calls", json=QUICKSTART, headers=key)
    # same JSON, keys in another order and other spacing: the same request
    reordered = dict(reversed(list(QUICKSTART.items())))
    s2, b2, r2 = await api.req("POST", "/v1/calls/originate", json=reordered, headers=key)
    assert (s1, s2) == (201, 201) and b1 == b2
    assert r2.headers["Idempotent-Replayed"] == "true"
    assert len(api.control.placed) == 1
    s3, b3, _ = await api.req(
        "POST", "/v1/calls", json={**QUICKSTART, "to": "+254722000009"}, headers=key
    )
    assert s3 == 409 and "different request body" in error(b3, "idempotency.conflict")["message"]
    assert len(api.control.placed) == 1
    s4, b4, _ = await api.req(
        "POST", "/v1/calls", json=QUICKSTART, headers={"Idempotency-Key": "bad key"}
    )
    assert s4 == 422 and error(b4, "validation.bad_request")["errors"][0]["path"] == (
        "Idempotency-Key"
    )


async def test_idempotent_key_in_flight(api: Api) -> None:
    api.control.hold = asyncio.Event()
    key = {"Idempotency-Key": "k-slow"}
    first = asyncio.ensure_future(api.req("POST", "/v1/calls", json=QUICKSTART, headers=key))
    await asyncio.wait_for(api.control.originating.wait(), 5)
    status, body, _ = await api.req("POST", "/v1/calls", json=QUICKSTART, headers=key)
    err = error(body, "idempotency.conflict")
    assert status == 409 and "not answered yet" in err["message"]
    assert err["call_ids"] == [api.control.placed[0].call_id]
    api.control.hold.set()
    s1, b1, _ = await first
    assert s1 == 201 and len(api.control.placed) == 1
    s2, b2, _ = await api.req("POST", "/v1/calls", json=QUICKSTART, headers=key)
    assert (s2, b2) == (201, b1)


async def test_idempotency_stores_4xx_not_5xx(api: Api) -> None:
    api.control.fail[TO] = ControlError(422, NUMBERS_NOT_FOUND, f"{FROM} is not a number here")
    key = {"Idempotency-Key": "k-4xx"}
    for _ in range(2):
        status, body, resp = await api.req("POST", "/v1/calls", json=QUICKSTART, headers=key)
        assert status == 422 and error(body, "numbers.not_found")
    assert resp.headers["Idempotent-Replayed"] == "true" and len(api.control.placed) == 1
    api.control.fail[TO] = ControlError(503, CAPACITY, "busy", 1)
    key = {"Idempotency-Key": "k-5xx"}
    status, _, _ = await api.req("POST", "/v1/calls", json=QUICKSTART, headers=key)
    assert status == 503
    del api.control.fail[TO]
    status, _, resp = await api.req("POST", "/v1/calls", json=QUICKSTART, headers=key)
    assert status == 201 and "Idempotent-Replayed" not in resp.headers
    assert len(api.control.placed) == 3


async def test_idempotent_replay_after_restart(tmp_path: Path) -> None:
    """The app opens its own store here (records=None), as a node without one would."""
    settings = settings_for(tmp_path)
    key = {**AUTH, "Idempotency-Key": "k-restart"}
    bodies = []
    for _ in range(2):
        control = FakeControl()
        runner, base = await serve(make_app(settings, control, tmp_path / "recordings"))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(base + "/v1/calls", json=QUICKSTART, headers=key) as r:
                    assert r.status == 201
                    bodies.append((await r.json(), r.headers.get("Idempotent-Replayed")))
        finally:
            await runner.cleanup()  # closes the store
        placed = len(control.placed)
    assert bodies[0][0] == bodies[1][0] and bodies[1][1] == "true"
    assert placed == 0  # the second gateway dialled nothing
    assert (tmp_path / "calls.sqlite3").exists()


# -- list and get ------------------------------------------------------------------------------


async def test_list_live_and_recent(api: Api) -> None:
    for i in range(5):
        api.records.note_call(
            stored(i, "completed" if i % 2 else "busy", "inbound" if i < 2 else "outbound")
        )
    # a call both live and stored appears once, in its live state
    api.records.note_call(stored(9, "ringing"))
    api.control.live["old9"] = stored(9, "in-progress", answered_at="2026-06-27T10:00:10.000Z")
    api.control.live["live1"] = {**stored(30, "in-progress"), "call_id": "live1", "id": "live1"}
    await api.records.flush()

    status, body, _ = await api.req("GET", "/v1/calls")
    assert status == 200
    ids = [c["call_id"] for c in body["data"]]
    assert ids == ["live1", "old9", "old4", "old3", "old2", "old1", "old0"]
    assert body["data"][1]["status"] == "in-progress" and body["next_cursor"] is None

    seen, cursor = [], None
    while True:
        q = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        status, body, _ = await api.req("GET", "/v1/calls" + q)
        seen += [c["call_id"] for c in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids

    _, body, _ = await api.req("GET", "/v1/calls?status=completed,in-progress")
    assert [c["call_id"] for c in body["data"]] == ["live1", "old9", "old3", "old1"]
    _, body, _ = await api.req("GET", "/v1/calls?direction=inbound&status=busy")
    assert [c["call_id"] for c in body["data"]] == ["old0"]
    _, body, _ = await api.req("GET", "/v1/calls?status=ringing")
    assert body["data"] == []  # old9's stored "ringing" is not its state

    for q, code in [
        ("limit=0", "validation.bad_request"),
        ("limit=101", "validation.bad_request"),
        ("limit=x", "validation.bad_request"),
        ("status=done", "validation.bad_request"),
        ("direction=sideways", "validation.bad_request"),
        ("cursor=garbage!", "validation.invalid_cursor"),
    ]:
        status, body, _ = await api.req("GET", "/v1/calls?" + q)
        assert status == 422 and error(body, code), q


async def test_get_call_live_ended_unknown(api: Api) -> None:
    _, created, _ = await api.req("POST", "/v1/calls", json=QUICKSTART)
    cid = created["call_id"]
    status, body, _ = await api.req("GET", f"/v1/calls/{cid}")
    assert status == 200 and body["call"]["status"] == "ringing" and body["call"]["events"] == []
    api.control.live.pop(cid)
    api.records.note_call(
        {
            "call_id": cid,
            "status": "completed",
            "duration_seconds": 3,
            "ended_at": "2026-06-27T10:00:09.000Z",
        }
    )
    api.records.note_event(
        cid, "ev1", "call.completed", {"status": "completed"}, "2026-06-27T10:00:09.000Z"
    )
    await api.records.flush()
    status, body, _ = await api.req("GET", f"/v1/calls/{cid}")
    call = body["call"]
    assert (call["id"], call["status"], call["duration_seconds"]) == (cid, "completed", 3)
    assert call["local_e164"] == FROM and call["remote_e164"] == TO
    assert call["events"] == [
        {
            "id": "ev1",
            "call_id": cid,
            "kind": "call.completed",
            "payload": {"status": "completed"},
            "occurred_at": "2026-06-27T10:00:09.000Z",
            "created_at": call["events"][0]["created_at"],
        }
    ]
    status, body, _ = await api.req("GET", "/v1/calls/nope")
    assert status == 404 and error(body, "calls.not_found")


# -- live control ----------------------------------------------------------------------------


async def test_hangup_live_ended_unknown(api: Api) -> None:
    _, created, _ = await api.req("POST", "/v1/calls", json=QUICKSTART)
    cid = created["call_id"]
    for _ in range(2):  # live, then ended (the fake drops it): the same answer
        status, body, _ = await api.req("POST", f"/v1/calls/{cid}/hangup")
        assert (status, body) == (200, {"call_id": cid, "status": "hung_up"})
    assert api.control.commands == [Hangup(call_id=cid)]
    status, body, _ = await api.req("POST", "/v1/calls/unknown/hangup")
    assert status == 404 and error(body, "calls.not_found")
    status, body, _ = await api.req("POST", f"/v1/calls/{cid}/hangup", auth=False)
    assert status == 401


async def test_redirect(api: Api) -> None:
    _, created, _ = await api.req("POST", "/v1/calls", json=QUICKSTART)
    cid = created["call_id"]
    bad = [
        ({"actions": [{"say": {"text": 1}}]}, "actions[0].say.text"),
        ({"url": "https://a/b", "actions": [{"hangup": {}}]}, ""),
        ({}, ""),
        ({"url": "/relative"}, "url"),
        ({"url": "https://a/b", "method": "PUT"}, "method"),
        ({"actions": [{"hangup": {}}], "urll": "x"}, "urll"),
    ]
    for body_in, path in bad:
        status, body, _ = await api.req("POST", f"/v1/calls/{cid}/redirect", json=body_in)
        assert status == 422, body_in
        assert error(body, "validation.bad_request")["errors"][0]["path"] == path
    assert api.control.commands == []  # the call untouched

    status, body, _ = await api.req(
        "POST",
        f"/v1/calls/{cid}/redirect",
        json={"url": "https://app.example/next", "method": "get"},
    )
    assert (status, body) == (200, {"call_id": cid, "status": "redirected"})
    doc = [{"say": {"text": "Moved"}}, {"hangup": {}}]
    status, _, _ = await api.req("POST", f"/v1/calls/{cid}/redirect", json={"actions": doc})
    assert status == 200
    assert api.control.commands == [
        Redirect(call_id=cid, url="https://app.example/next", method="GET"),
        Redirect(call_id=cid, actions=doc),
    ]
    api.control.live.pop(cid)
    status, body, _ = await api.req("POST", f"/v1/calls/{cid}/redirect", json={"actions": doc})
    assert status == 409 and error(body, "calls.ended")
    status, body, _ = await api.req("POST", "/v1/calls/unknown/redirect", json={"actions": doc})
    assert status == 404 and error(body, "calls.not_found")


async def test_respond(api: Api) -> None:
    _, created, _ = await api.req("POST", "/v1/calls", json=QUICKSTART)
    cid = created["call_id"]
    status, body, _ = await api.req("POST", f"/v1/calls/{cid}/respond", json={"actions": "x"})
    assert status == 422 and error(body, "validation.bad_request")["errors"][0]["path"] == (
        "actions"
    )
    doc = [{"say": {"text": "Next?"}}]
    status, body, _ = await api.req("POST", f"/v1/calls/{cid}/respond", json={"actions": doc})
    assert (status, body) == (200, {"call_id": cid, "status": "accepted"})
    assert api.control.commands == [Respond(call_id=cid, actions=doc)]
    api.control.live.pop(cid)
    status, body, _ = await api.req("POST", f"/v1/calls/{cid}/respond", json={"actions": doc})
    assert status == 409 and error(body, "calls.ended")


async def test_node_errors_pass_through(api: Api) -> None:
    async def refuse(op: Any) -> dict[str, Any]:
        raise ControlError(409, "calls.not_controlled", "not under MCP control")

    api.control.live["c1"] = stored(1, "in-progress") | {"call_id": "c1", "id": "c1"}
    api.control.command = refuse  # type: ignore[method-assign]
    status, body, _ = await api.req(
        "POST", "/v1/calls/c1/respond", json={"actions": [{"hangup": {}}]}
    )
    assert status == 409 and error(body, "calls.not_controlled")


# -- recordings --------------------------------------------------------------------------------


async def test_recording_states_and_signed_link(api: Api) -> None:
    api.records.note_call(stored(1, "completed"))
    await api.records.flush()
    status, body, _ = await api.req("GET", "/v1/calls/old1/recording")
    assert status == 404 and error(body, "calls.recording_not_found")
    status, body, _ = await api.req("GET", "/v1/calls/nope/recording")
    assert status == 404 and error(body, "calls.not_found")

    await api.records.set_recording("old1", "rec_1", "in_progress")
    status, body, resp = await api.req("GET", "/v1/calls/old1/recording")
    assert (status, body) == (202, {"retry_after_seconds": 2}) and resp.headers["Retry-After"]

    data = b"RIFF" + bytes(64)
    (api.recordings / "rec_1.wav").write_bytes(data)
    await api.records.set_recording("old1", "rec_1", "ready")
    status, body, resp = await api.req("GET", "/v1/calls/old1/recording")
    assert status == 302
    link = resp.headers["Location"]
    assert link.startswith(api.base + "/recordings/rec_1?exp=") and body["url"] == link
    exp = int(URL(link).query["exp"])
    assert abs(exp - (api.clock.now + 900)) <= 1

    async with api.http.get(link) as r:  # no bearer token
        assert r.status == 200 and await r.read() == data
        assert r.headers["Content-Type"] == "audio/wav"
    forged = str(URL(link).update_query(sig="0" * 64))
    status, body, _ = await api.req("GET", forged.removeprefix(api.base), auth=False)
    assert status == 403 and error(body, "auth.token_invalid")
    other = link.replace("/rec_1?", "/rec_2?")
    status, body, _ = await api.req("GET", other.removeprefix(api.base), auth=False)
    assert status == 403
    api.clock.now += 901
    status, body, _ = await api.req("GET", link.removeprefix(api.base), auth=False)
    assert status == 403 and error(body, "calls.recording_expired")
    status, _, _ = await api.req("GET", "/recordings/rec_1", auth=False)
    assert status == 403

    # the token route still serves it (voice callbacks' older RecordingUrl)
    async with api.http.get(api.base + "/v1/recordings/rec_1", headers=AUTH) as r:
        assert r.status == 200 and await r.read() == data


async def test_recording_failed_and_missing_file(api: Api) -> None:
    api.records.note_call(stored(2, "completed"))
    await api.records.set_recording("old2", "rec_f", "failed")
    status, body, _ = await api.req("GET", "/v1/calls/old2/recording")
    assert status == 404 and error(body, "calls.recording_failed")
    await api.records.set_recording("old2", "rec_gone", "ready")
    status, body, _ = await api.req("GET", "/v1/calls/old2/recording")
    assert status == 404 and error(body, "calls.recording_not_found")
