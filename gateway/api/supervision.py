"""Call supervision on the internal API (the SDK's `calls.supervise` and friends).

    POST   /v1/calls/{id}/supervision   {mode, supervisor, announce?, label?, notify_agent?}
                                        (Idempotency-Key)                  -> 201 CallSupervision
    PATCH  /v1/calls/{id}/supervision   {mode}  (409 while the supervisor rings) -> 200
    DELETE /v1/calls/{id}/supervision   idempotent                          -> 200 (or 404)
    GET    /v1/calls/{id}/supervision                         -> 200 {"supervision": ... | null}

The supervised call must be live and bridged (a `dial`); a second supervisor is 409
`calls.supervision_in_progress`. `client` supervisors (a browser, `client:<identity>`) need
`[webrtc] enabled`, else 422.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from gateway.api.calls import (
    CONTROL_KEY,
    _bad_request,
    _canonical_hash,
    _control_error,
    _error_body,
    _idempotency_key,
    _json_body,
    _records,
)
from gateway.api.errors import CALLS_ENDED, CALLS_NOT_FOUND, IDEMPOTENCY_CONFLICT, ApiError
from gateway.api.originate import BodyIssue, pydantic_issues
from gateway.calls.control import ControlError
from gateway.supervision.registry import NOT_FOUND, Supervisions
from gateway.supervision.request import ChangeMode, ClientSupervisor, StartSupervision

SUPERVISIONS_KEY = web.AppKey("supervisions", Supervisions)
CLIENTS_KEY = web.AppKey("supervision_clients", bool)  # browsers can be dialled
CLIENT_UNSUPPORTED = "supervision.client_unsupported"


def setup_supervision(app: web.Application, supervisions: Supervisions,
                      clients: bool = False) -> None:
    app[SUPERVISIONS_KEY] = supervisions
    app[CLIENTS_KEY] = clients
    r = app.router
    r.add_post("/v1/calls/{id}/supervision", _start)
    r.add_patch("/v1/calls/{id}/supervision", _patch)
    r.add_delete("/v1/calls/{id}/supervision", _delete)
    r.add_get("/v1/calls/{id}/supervision", _get)


async def _live_call(request: web.Request) -> dict[str, Any]:
    call_id = request.match_info["id"]
    live = request.app[CONTROL_KEY].live_call(call_id)
    if live is not None:
        return live
    if await _records(request).get(call_id):
        raise ApiError(409, CALLS_ENDED, f"call {call_id} has ended")
    raise ApiError(404, CALLS_NOT_FOUND, f"no call {call_id}")


def _parse(model: type[StartSupervision] | type[ChangeMode], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise _bad_request(pydantic_issues(err)) from None


async def _begin(request: web.Request, raw: Any) -> tuple[int, dict[str, Any]]:
    req: StartSupervision = _parse(StartSupervision, raw)
    if isinstance(req.supervisor, ClientSupervisor) and not request.app[CLIENTS_KEY]:
        raise ApiError(
            422, CLIENT_UNSUPPORTED,
            "supervisor.type \"client\" needs browser calling ([webrtc] enabled): use "
            "{\"type\": \"phone\", \"number\"} or {\"type\": \"sip\", \"identity\"}",
        )
    call = await _live_call(request)
    sups = request.app[SUPERVISIONS_KEY]
    try:
        sup = await sups.start(call["call_id"], call.get("session_id") or call["call_id"], req)
    except ControlError as exc:
        raise _control_error(exc) from None
    return 201, sup.view()


async def _start(request: web.Request) -> web.Response:
    key = _idempotency_key(request)
    raw = await _json_body(request)
    if key is None:
        status, body = await _begin(request, raw)
        return web.json_response(body, status=status)
    records = _records(request)
    scoped = f"supervision:{request.match_info['id']}:{key}"
    body_hash = _canonical_hash(raw)
    prior = await records.idempotency_claim(scoped, body_hash, [request.match_info["id"]])
    if prior is not None:
        if prior.body_hash != body_hash or prior.in_flight:
            raise ApiError(
                409, IDEMPOTENCY_CONFLICT,
                "this Idempotency-Key was used with a different request body, or its first "
                "request has not answered yet",
            )
        replayed = {"Idempotent-Replayed": "true"}
        stored = prior.response if isinstance(prior.response, dict) else {}
        status = prior.status or 200
        if status >= 400 and isinstance(stored.get("error"), dict):
            e = dict(stored["error"])
            raise ApiError(status, str(e.pop("code", "")), str(e.pop("message", "")), replayed, e)
        return web.json_response(stored, status=status, headers=replayed)

    async def run_and_store() -> tuple[int, dict[str, Any]]:
        try:
            status, body = await _begin(request, raw)
        except ApiError as err:
            if err.status >= 500 or err.code == "validation.bad_request":
                await records.idempotency_release(scoped)
            else:
                await records.idempotency_put(scoped, err.status, _error_body(err))
            raise
        except BaseException:
            await records.idempotency_release(scoped)
            raise
        await records.idempotency_put(scoped, status, body)
        return status, body

    # Shielded: a client gone mid-request must not leave a supervisor ringing unrecorded.
    status, body = await asyncio.shield(asyncio.ensure_future(run_and_store()))
    return web.json_response(body, status=status)


async def _patch(request: web.Request) -> web.Response:
    req: ChangeMode = _parse(ChangeMode, await _json_body(request))
    call = await _live_call(request)
    try:
        sup = await request.app[SUPERVISIONS_KEY].change(call["call_id"], req.mode)
    except ControlError as exc:
        raise _control_error(exc) from None
    return web.json_response(sup.view())


async def _delete(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    sups = request.app[SUPERVISIONS_KEY]
    try:
        sup = await sups.end(call_id)
    except ControlError as exc:
        raise _control_error(exc) from None
    if sup is None:
        raise ApiError(404, NOT_FOUND, f"call {call_id} has no supervision")
    return web.json_response(sup.view())


async def _get(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    sup = request.app[SUPERVISIONS_KEY].current(call_id)
    if sup is None:
        await _live_call(request)  # 404 / 409 for a call that does not exist or has ended
    return web.json_response({"supervision": sup.view() if sup is not None else None})


__all__ = ["SUPERVISIONS_KEY", "BodyIssue", "setup_supervision"]
