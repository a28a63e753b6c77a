"""Live conference control on the internal API (bearer token, the product's error envelope).

    GET    /v1/conferences                                   live rooms -> {data}
    GET    /v1/conferences/{name}                            -> {conference} with participants
    POST   /v1/conferences/{name}/participants/{call_id}     {"muted": bool} and/or {"hold": bool}
    DELETE /v1/conferences/{name}/participants/{call_id}     kick: its document goes on
    DELETE /v1/conferences/{name}                            end it for everyone

Room names are per workspace: every route takes `?workspace_id=`. Without it a name that
exists in several workspaces is 409 `conferences.ambiguous_name` (the error lists them).
The rooms are the node's (gateway/rooms/registry.py).

In a cluster a room lives on its home node: a name not homed here is asked of the live peers
(the same routes under /cluster/, local only, with the cluster token) and their answer is
passed on, so any node shows and steers the whole room; the listing is every node's.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.api.calls import _json_body, _object_body
from gateway.api.errors import VALIDATION_BAD_REQUEST, ApiError
from gateway.cluster.membership import PeerUnavailable
from gateway.events.envelope import rfc3339_ms
from gateway.rooms.registry import (
    ParticipantNotFound,
    Room,
    RoomAmbiguous,
    RoomNotFound,
    RoomRegistry,
)

__all__ = ["ROOMS_KEY", "setup_conferences"]

CONFERENCES_NOT_FOUND = "conferences.not_found"
CONFERENCES_AMBIGUOUS = "conferences.ambiguous_name"
PARTICIPANT_NOT_FOUND = "conferences.participant_not_found"

ROOMS_KEY = web.AppKey("rooms", RoomRegistry)


def setup_conferences(app: web.Application, rooms: RoomRegistry) -> None:
    app[ROOMS_KEY] = rooms
    r = app.router
    prefixes = ["/v1"]
    if rooms.cluster is not None:  # the local-only routes peers forward to
        from gateway.cluster.routes import setup_cluster

        setup_cluster(app, rooms)
        prefixes.append("/cluster/v1")
    for pre in prefixes:
        r.add_get(f"{pre}/conferences", _list)
        r.add_get(f"{pre}/conferences/{{name}}", _elsewhere_too(_get))
        r.add_delete(f"{pre}/conferences/{{name}}", _elsewhere_too(_end))
        r.add_post(f"{pre}/conferences/{{name}}/participants/{{call_id}}",
                   _elsewhere_too(_update))
        r.add_delete(f"{pre}/conferences/{{name}}/participants/{{call_id}}",
                     _elsewhere_too(_kick))


def _forwarding(request: web.Request) -> bool:
    return (request.app[ROOMS_KEY].cluster is not None
            and not request.path.startswith("/cluster/"))


def _elsewhere_too(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler here; a room not homed here is the first live peer's that has it."""
    async def run(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except ApiError as e:
            if e.code != CONFERENCES_NOT_FOUND or not _forwarding(request):
                raise
            raw = await request.read()
            body = json.loads(raw) if raw else None
            cluster = request.app[ROOMS_KEY].cluster
            assert cluster is not None
            for node in cluster.live_peers():
                try:
                    status, out = await cluster.request(
                        node, request.method, "/cluster" + request.path_qs, body)
                except PeerUnavailable:
                    continue
                if status == 404 and out.get("error", {}).get("code") == CONFERENCES_NOT_FOUND:
                    continue
                return web.json_response(out, status=status)
            raise

    return run


def _ts(t: float) -> str:
    return rfc3339_ms(datetime.fromtimestamp(t, UTC))


def _room_view(room: Room, *, participants: bool = False) -> dict[str, Any]:
    v = room.view(participants=participants)
    v["created_at"] = _ts(room.created_at)
    for p in v.get("participants", []):
        p["joined_at"] = _ts(p["joined_at"])
    return v


def _room(request: web.Request) -> Room:
    name = request.match_info["name"]
    ws = request.query.get("workspace_id") or None
    try:
        return request.app[ROOMS_KEY].find(name, ws)
    except RoomAmbiguous as e:
        raise ApiError(
            409, CONFERENCES_AMBIGUOUS,
            f"conference {name!r} exists in several workspaces; give ?workspace_id=",
            extra={"workspaces": e.workspaces},
        ) from None
    except RoomNotFound:
        where = f" in workspace {ws}" if ws else ""
        raise ApiError(404, CONFERENCES_NOT_FOUND,
                       f"no live conference {name!r}{where}") from None


def _not_in(room: Room, call_id: str) -> ApiError:
    return ApiError(404, PARTICIPANT_NOT_FOUND,
                    f"call {call_id} is not in conference {room.name!r}")


async def _list(request: web.Request) -> web.Response:
    ws = request.query.get("workspace_id") or None
    registry = request.app[ROOMS_KEY]
    data = [_room_view(r) for r in registry.listing(ws)]
    if _forwarding(request):
        assert registry.cluster is not None
        for node in registry.cluster.live_peers():
            try:
                status, out = await registry.cluster.request(
                    node, "GET", "/cluster" + request.path_qs)
            except PeerUnavailable:
                continue
            if status == 200:
                data += out.get("data", [])
    return web.json_response({"data": data})


async def _get(request: web.Request) -> web.Response:
    return web.json_response({"conference": _room_view(_room(request), participants=True)})


async def _update(request: web.Request) -> web.Response:
    room = _room(request)
    call_id = request.match_info["call_id"]
    body = _object_body(await _json_body(request), ("muted", "hold"))
    bad = [k for k in ("muted", "hold") if k in body and not isinstance(body[k], bool)]
    if not body or bad:
        raise ApiError(422, VALIDATION_BAD_REQUEST,
                       'give "muted" and/or "hold" as booleans',
                       extra={"errors": [{"path": k, "message": "expected a boolean"}
                                         for k in bad]})
    try:
        p = await request.app[ROOMS_KEY].set_flags(
            room, call_id, muted=body.get("muted"), hold=body.get("hold"))
    except ParticipantNotFound:
        raise _not_in(room, call_id) from None
    view = p.view()
    view["joined_at"] = _ts(p.joined_at)
    return web.json_response({"participant": view})


async def _kick(request: web.Request) -> web.Response:
    room = _room(request)
    call_id = request.match_info["call_id"]
    try:
        await request.app[ROOMS_KEY].kick(room, call_id)
    except ParticipantNotFound:
        raise _not_in(room, call_id) from None
    return web.json_response({"call_id": call_id, "removed": True})


async def _end(request: web.Request) -> web.Response:
    room = _room(request)
    n = await request.app[ROOMS_KEY].end(room)
    return web.json_response({"name": room.name, "workspace_id": room.workspace_id,
                              "ended": True, "participants": n})
