"""Node-to-node routes (under /cluster/, the cluster token; gateway/api/app.py checks it).

    GET  /cluster/v1/ping          -> {node_id, live}                liveness (membership.py)
    POST /cluster/v1/rooms/join    {node, worker, op: RoomJoin}      at the room's home
    POST /cluster/v1/rooms/leave   {node, call_id, room_id}          at the room's home
    POST /cluster/v1/rooms/part    {home, part: RoomPart}            at a node with members
    /cluster/v1/conferences...     the conference API, this node's homed rooms only

A join's answer is the worker's (`{room_id, started, count}`), a refusal is 409 `{code,
message}` (e.g. room_full), passed to the joining worker as is.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from gateway.control.errors import OpRefused
from gateway.control.room_join import RoomJoin
from gateway.control.room_leave import RoomLeave
from gateway.control.room_part import RoomPart
from gateway.rooms.registry import RoomRegistry

REGISTRY_KEY = web.AppKey("cluster_rooms", RoomRegistry)


def setup_cluster(app: web.Application, rooms: RoomRegistry) -> None:
    app[REGISTRY_KEY] = rooms
    r = app.router
    r.add_get("/cluster/v1/ping", _ping)
    r.add_post("/cluster/v1/rooms/join", _join)
    r.add_post("/cluster/v1/rooms/leave", _leave)
    r.add_post("/cluster/v1/rooms/part", _part)


def _rooms(request: web.Request) -> RoomRegistry:
    return request.app[REGISTRY_KEY]


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected an object")
    return body


async def _ping(request: web.Request) -> web.Response:
    rooms = _rooms(request)
    live = rooms.cluster.live_peers() if rooms.cluster is not None else []
    return web.json_response({"node_id": rooms.node_id, "live": live})


async def _join(request: web.Request) -> web.Response:
    rooms = _rooms(request)
    body = await _body(request)
    try:
        node, worker = str(body["node"]), int(body["worker"])
        op = RoomJoin.model_validate(body["op"])
    except (KeyError, TypeError, ValueError, ValidationError) as e:
        raise web.HTTPBadRequest(text=str(e)) from None
    try:
        result = await rooms.join_here(rooms.virtual(node), op, node=node, node_worker=worker)
    except OpRefused as e:
        return web.json_response({"code": e.code, "message": e.message}, status=409)
    return web.json_response(result)


async def _leave(request: web.Request) -> web.Response:
    rooms = _rooms(request)
    body = await _body(request)
    try:
        op = RoomLeave(call_id=str(body["call_id"]), room_id=str(body["room_id"]))
    except (KeyError, ValidationError) as e:
        raise web.HTTPBadRequest(text=str(e)) from None
    return web.json_response(await rooms.on_leave(-1, op))


async def _part(request: web.Request) -> web.Response:
    rooms = _rooms(request)
    body = await _body(request)
    try:
        home, part = str(body["home"]), RoomPart.model_validate(body["part"])
    except (KeyError, ValidationError) as e:
        raise web.HTTPBadRequest(text=str(e)) from None
    return web.json_response(await rooms.apply_part(home, part))
