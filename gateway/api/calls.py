"""The calls API: place calls, list and read them, steer live ones, fetch their recordings.

    POST /v1/calls, /v1/calls/originate   create (Idempotency-Key)      -> 201
    GET  /v1/calls                         live + recent, newest first  -> {data, next_cursor}
    GET  /v1/calls/{id}                    live or ended, with events   -> {call}
    POST /v1/calls/{id}/hangup             idempotent                   -> {call_id, status}
    POST /v1/calls/{id}/redirect           {url, method} | {actions}
    POST /v1/calls/{id}/stream             {action: "stop", name?}
    POST /v1/calls/{id}/respond            {actions} (control: "mcp")
    GET  /v1/calls/{id}/recording          302 signed link | 202 | 404
    GET  /recordings/{rid}?exp=&sig=       the file, no bearer token (the signature instead)
    GET  /v1/recordings/{rid}              the file, bearer token (older callbacks' links)

Live calls come from the node (`CallControl`); ended ones from `CallRecords`. A call known to
both is the node's version (live state wins), over the stored fields.

Idempotency (README "Calls API"): the key is claimed durably before anything is placed; a
replay within 24 h answers the stored status and body (`Idempotent-Replayed: true`), the same
key with another body (canonical JSON hash) or while its first request is still running is 409
`idempotency.conflict`. Stored: 201s and 4xx answers from placing the call (a replay must not
dial, and must not succeed where the first failed); not stored: a body refused by validation
(nothing was tried) and 5xx (503 capacity is for retrying with the same key).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from config.settings import Settings
from dsl.document import check_depth
from dsl.errors import DocumentError
from gateway.api.errors import (
    AUTH_TOKEN_INVALID,
    CALLS_ALREADY_EXISTS,
    CALLS_ENDED,
    CALLS_NOT_FOUND,
    IDEMPOTENCY_CONFLICT,
    RECORDING_EXPIRED,
    RECORDING_FAILED,
    RECORDING_NOT_FOUND,
    VALIDATION_BAD_REQUEST,
    VALIDATION_INVALID_CURSOR,
    ApiError,
)
from gateway.api.originate import (
    BodyError,
    BodyIssue,
    CreatePlan,
    check_actions,
    check_url,
    parse_create,
)
from gateway.calls.control import CallControl, ControlError, OutboundCall
from gateway.calls.links import LinkError, LinkSigner
from gateway.calls.records import CallRecords, Recording, sort_key
from gateway.control.hangup import Hangup
from gateway.control.redirect import Redirect
from gateway.control.respond import Respond
from gateway.control.stream_stop import StreamStop
from gateway.events.envelope import rfc3339_ms

__all__ = ["CONTROL_KEY", "LINKS_KEY", "setup_calls"]

log = logging.getLogger(__name__)


STATUSES = frozenset(
    {"ringing", "in-progress", "completed", "failed", "busy", "no_answer", "canceled", "rejected"}
)
DIRECTIONS = frozenset({"inbound", "outbound"})
DEFAULT_LIMIT, MAX_LIMIT = 25, 100
MAX_IDEMPOTENCY_KEY = 255
RECORDING_RETRY_S = 2  # 202's retry_after_seconds while a recording is written
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII, like a header token
_RECORDING_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # no dots, no slashes
_MAX_BODY = 1024 * 1024


@dataclass
class _Config:
    settings: Settings
    recordings_dir: Path
    records: CallRecords | None  # set on startup when the app opens its own


CONTROL_KEY = web.AppKey("call_control", CallControl)
LINKS_KEY = web.AppKey("recording_links", LinkSigner)
_CONFIG_KEY = web.AppKey("calls_config", _Config)


def setup_calls(
    app: web.Application,
    *,
    settings: Settings,
    control: CallControl,
    records: CallRecords | None,
    links: LinkSigner,
    recordings_dir: Path,
) -> None:
    """Register the calls routes. `records=None`: the app opens `storage.dir/calls.sqlite3`
    itself on startup and closes it on cleanup (a caller that passes its own closes it)."""
    app[CONTROL_KEY] = control
    app[LINKS_KEY] = links
    cfg = app[_CONFIG_KEY] = _Config(settings, recordings_dir, records)
    if records is None:

        async def own_records(app: web.Application) -> AsyncIterator[None]:
            path = CallRecords.default_path(settings.storage.dir)
            cfg.records = await CallRecords.open(path)
            yield
            await cfg.records.close()

        app.cleanup_ctx.append(own_records)
    r = app.router
    r.add_post("/v1/calls", _create)
    r.add_post("/v1/calls/originate", _create)
    r.add_get("/v1/calls", _list)
    r.add_get("/v1/calls/{id}", _get)
    r.add_post("/v1/calls/{id}/hangup", _hangup)
    r.add_post("/v1/calls/{id}/redirect", _redirect)
    r.add_post("/v1/calls/{id}/respond", _respond)
    r.add_post("/v1/calls/{id}/stream", _stream)
    r.add_get("/v1/calls/{id}/recording", _recording)
    r.add_get("/recordings/{rid}", _signed_recording)
    r.add_get("/v1/recordings/{rid}", _token_recording)


def _cfg(request: web.Request) -> _Config:
    return request.app[_CONFIG_KEY]


def _records(request: web.Request) -> CallRecords:
    records = request.app[_CONFIG_KEY].records
    if records is None:
        raise RuntimeError("call records are not open (the app has not started)")
    return records


# -- helpers ---------------------------------------------------------------------------------


def _bad_request(issues: list[BodyIssue]) -> ApiError:
    return ApiError(
        422,
        VALIDATION_BAD_REQUEST,
        "; ".join(map(str, issues)),
        extra={"errors": [{"path": i.path, "message": i.message} for i in issues]},
    )


def _control_error(exc: ControlError) -> ApiError:
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if exc.status == 503 or exc.retry_after_s is not None:
        after = max(1, math.ceil(exc.retry_after_s or 1))
        headers["Retry-After"] = str(after)
        extra["retry_after_seconds"] = after
    return ApiError(exc.status, exc.code, exc.message, headers, extra)


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if len(raw) > _MAX_BODY:
        raise _bad_request([BodyIssue("", f"body is larger than {_MAX_BODY} bytes")])
    if not raw.strip():
        raise _bad_request([BodyIssue("", "expected a JSON object body")])
    try:
        check_depth(raw)  # json.loads recurses: refuse absurd nesting before parsing
        return json.loads(raw)
    except DocumentError as err:
        raise _bad_request([BodyIssue("", str(err))]) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _bad_request([BodyIssue("", f"body is not valid JSON ({err})")]) from None


def _canonical_hash(body: Any) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _now_iso() -> str:
    return rfc3339_ms(datetime.now(UTC))


async def _known(request: web.Request, call_id: str) -> dict[str, Any] | None:
    """The call as the API shows it: the stored record with the live summary over it."""
    live = request.app[CONTROL_KEY].live_call(call_id)
    stored = await _records(request).get(call_id)
    if live is None and stored is None:
        return None
    return (stored or {}) | (live or {})


def _not_found(call_id: str) -> ApiError:
    return ApiError(404, CALLS_NOT_FOUND, f"no call {call_id}")


# -- create ----------------------------------------------------------------------------------


def _created(call: OutboundCall, summary: dict[str, Any]) -> dict[str, Any]:
    """One placed call, with both the quickstart's fields (id, created_at) and the SDK's."""
    out: dict[str, Any] = {
        "call_id": call.call_id,
        "id": call.call_id,
        "session_id": summary.get("session_id") or call.session_id or call.call_id,
        "status": "ringing",
        "direction": "outbound",
        "to": call.to,
        "from": call.from_,
        "created_at": summary.get("started_at") or _now_iso(),
    }
    if call.client_request_id is not None:
        out["client_request_id"] = call.client_request_id
    return out


def _not_placed(call: OutboundCall, err: ApiError) -> dict[str, Any]:
    out: dict[str, Any] = {
        "call_id": call.call_id,
        "id": call.call_id,
        "status": "failed",
        "direction": "outbound",
        "to": call.to,
        "from": call.from_,
        "error": {"code": err.code, "message": err.message, **err.extra},
    }
    if call.client_request_id is not None:
        out["client_request_id"] = call.client_request_id
    return out


async def _place(
    control: CallControl, records: CallRecords, call: OutboundCall
) -> dict[str, Any] | ApiError:
    try:
        summary = await control.originate(call)
    except ControlError as exc:
        return _control_error(exc)
    except Exception:
        log.exception("originate %s failed", call.call_id)
        return ApiError(500, "internal_error", "internal error placing the call")
    summary = summary or {}
    # What the API knows of the call, under what the node says: the record is whole even if
    # the node's summary is partial, and keyed by the id the client was given.
    records.note_call(
        {
            "direction": "outbound",
            "from": call.from_,
            "to": call.to,
            "local_e164": call.from_,
            "remote_e164": call.to,
            "status": "ringing",
            "client_request_id": call.client_request_id,
            "session_id": call.session_id or call.call_id,
            "started_at": _now_iso(),
            **summary,
            "call_id": call.call_id,
            "id": call.call_id,
        }
    )
    return summary


async def _execute(
    request: web.Request, plan: CreatePlan
) -> tuple[int, dict[str, Any], ApiError | None]:
    """Place every call of the plan (concurrently: the node queues for capacity) and build the
    answer: (status, body) for a 201, or the error when nothing was placed."""
    control, records = request.app[CONTROL_KEY], _records(request)
    # Only a single call can carry the client's own call_id; a generated one is new.
    for call in plan.calls if len(plan.calls) == 1 else ():
        if control.live_call(call.call_id) is not None or await records.get(call.call_id):
            err = ApiError(409, CALLS_ALREADY_EXISTS, f"a call {call.call_id} already exists")
            return err.status, {}, err
    results = await asyncio.gather(*(_place(control, records, c) for c in plan.calls))
    entries = [
        _not_placed(c, r) if isinstance(r, ApiError) else _created(c, r)
        for c, r in zip(plan.calls, results, strict=True)
    ]
    placed = [e for e in entries if "error" not in e]
    if not placed:
        first = next(r for r in results if isinstance(r, ApiError))
        return first.status, {}, first
    body = dict(placed[0])
    if plan.to_is_list:
        body["calls"] = entries
    if plan.ignored_fields:
        body["ignored_fields"] = plan.ignored_fields
    return 201, body, None


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not _IDEMPOTENCY_KEY_RE.match(key):
        raise _bad_request(
            [
                BodyIssue(
                    "Idempotency-Key",
                    f"header must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters",
                )
            ]
        )
    return key


async def _create(request: web.Request) -> web.Response:
    key = _idempotency_key(request)
    raw = await _json_body(request)
    try:
        plan = parse_create(raw, _cfg(request).settings)
    except BodyError as bad:
        raise _bad_request(bad.issues) from None
    if key is None:
        status, body, err = await _execute(request, plan)
        if err is not None:
            raise err
        return web.json_response(body, status=status)

    records = _records(request)
    body_hash = _canonical_hash(raw)
    prior = await records.idempotency_claim(key, body_hash, [c.call_id for c in plan.calls])
    if prior is not None:
        if prior.body_hash != body_hash:
            raise ApiError(
                409,
                IDEMPOTENCY_CONFLICT,
                "this Idempotency-Key was used with a different request body; use a new key",
            )
        if prior.in_flight:
            raise ApiError(
                409,
                IDEMPOTENCY_CONFLICT,
                "the first request with this Idempotency-Key has not answered yet (it is still"
                " placing its calls, or a restart interrupted it): retry later, or look the"
                " calls up by id",
                extra={"call_ids": prior.call_ids},
            )
        replayed = {"Idempotent-Replayed": "true"}
        status = prior.status or 200
        stored = prior.response if isinstance(prior.response, dict) else {}
        if status >= 400 and isinstance(stored.get("error"), dict):
            e = dict(stored["error"])
            code, message = str(e.pop("code", "")), str(e.pop("message", ""))
            raise ApiError(status, code, message, replayed, e)  # with a fresh request_id
        return web.json_response(prior.response, status=status, headers=replayed)

    async def run_and_store() -> tuple[int, dict[str, Any], ApiError | None]:
        try:
            status, body, err = await _execute(request, plan)
        except BaseException:
            await records.idempotency_release(key)
            raise
        if status >= 500:
            await records.idempotency_release(key)
        else:
            stored = body if err is None else _error_body(err)
            await records.idempotency_put(key, status, stored)
        return status, body, err

    # Shielded: a client that hangs up mid-request must not leave the key claimed forever
    # while its calls ring (or leave them placed without the answer a retry would replay).
    status, body, err = await asyncio.shield(asyncio.ensure_future(run_and_store()))
    if err is not None:
        raise err
    return web.json_response(body, status=status)


def _error_body(err: ApiError) -> dict[str, Any]:
    """What a replay of a refused create answers (a fresh request_id is not kept: the error
    middleware gives the replay its own)."""
    return {"error": {**err.extra, "code": err.code, "message": err.message}}


# -- read --------------------------------------------------------------------------------------


def _encode_cursor(key: tuple[int, str]) -> str:
    raw = json.dumps([key[0], key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(text: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        ms, call_id = json.loads(raw)
        if isinstance(ms, int) and not isinstance(ms, bool) and isinstance(call_id, str):
            return ms, call_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        pass
    raise ApiError(422, VALIDATION_INVALID_CURSOR, "cursor: not a cursor this API returned")


def _list_params(
    request: web.Request,
) -> tuple[int, tuple[int, str] | None, set[str] | None, str | None]:
    q = request.query
    issues: list[BodyIssue] = []
    limit = DEFAULT_LIMIT
    if "limit" in q:
        try:
            limit = int(q["limit"])
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_LIMIT:
            issues.append(BodyIssue("limit", f"expected an integer from 1 to {MAX_LIMIT}"))
    statuses = None
    if "status" in q:
        statuses = {s.strip() for s in q["status"].split(",") if s.strip()}
        unknown = sorted(statuses - STATUSES)
        if unknown or not statuses:
            issues.append(
                BodyIssue(
                    "status",
                    f"unknown status {', '.join(unknown) or '(empty)'}; expected a comma list"
                    f" of {', '.join(sorted(STATUSES))}",
                )
            )
    direction = q.get("direction")
    if direction is not None and direction not in DIRECTIONS:
        issues.append(BodyIssue("direction", "expected inbound or outbound"))
    if issues:
        raise _bad_request(issues)
    cursor = _decode_cursor(q["cursor"]) if q.get("cursor") else None
    return limit, cursor, statuses, direction


async def _list(request: web.Request) -> web.Response:
    limit, cursor, statuses, direction = _list_params(request)

    def wanted(s: dict[str, Any]) -> bool:
        return (
            (statuses is None or s.get("status") in statuses)
            and (direction is None or s.get("direction") == direction)
            and (cursor is None or sort_key(s) < cursor)
        )

    live = {str(s.get("call_id") or s.get("id")): s for s in request.app[CONTROL_KEY].live_calls()}
    # Enough stored rows that dropping the live ones (shown in their live state) still leaves
    # limit + 1 when there are that many: the +1 says whether there is a next page.
    stored = await _records(request).list(limit + 1 + len(live), cursor, statuses, direction)
    merged = [s for s in stored if str(s.get("call_id")) not in live]
    merged += [s for s in live.values() if wanted(s)]
    merged.sort(key=sort_key, reverse=True)
    page = merged[:limit]
    next_cursor = _encode_cursor(sort_key(page[-1])) if len(merged) > limit else None
    return web.json_response({"data": page, "next_cursor": next_cursor})


async def _get(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    call = await _known(request, call_id)
    if call is None:
        raise _not_found(call_id)
    events = await _records(request).events(call_id)
    call["events"] = [e.api() for e in events]
    return web.json_response({"call": call})


# -- live control ----------------------------------------------------------------------------


async def _command(
    request: web.Request, op: Hangup | Redirect | Respond | StreamStop
) -> dict[str, Any] | None:
    """Run `op`; None when the call is not live but known (ended); 404 when unknown."""
    try:
        return await request.app[CONTROL_KEY].command(op)
    except ControlError as exc:
        if exc.code != CALLS_NOT_FOUND:
            raise _control_error(exc) from None
    if await _records(request).get(op.call_id) is None:
        raise _not_found(op.call_id)
    return None


async def _hangup(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    await _command(request, Hangup(call_id=call_id))  # an ended call: the same answer
    return web.json_response({"call_id": call_id, "status": "hung_up"})


def _object_body(raw: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _bad_request([BodyIssue("", "expected a JSON object body")])
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise _bad_request(
            [BodyIssue(k, f"unknown field; expected {' or '.join(allowed)}") for k in unknown]
        )
    return raw


def _ended(call_id: str, what: str) -> ApiError:
    return ApiError(409, CALLS_ENDED, f"call {call_id} has ended; it cannot be {what}")


async def _redirect(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    body = _object_body(await _json_body(request), ("url", "method", "actions"))
    issues: list[BodyIssue] = []
    url, actions = body.get("url"), body.get("actions")
    method = body.get("method", "POST")
    if (url is None) == (actions is None):
        issues.append(BodyIssue("", "give exactly one of url or actions"))
    if url is not None:
        issues += check_url(url, "url", _cfg(request).settings)
    if actions is not None:
        issues += check_actions(actions, "actions")
        if "method" in body:
            issues.append(BodyIssue("method", "only with url"))
    if not isinstance(method, str) or method.upper() not in ("POST", "GET"):
        issues.append(BodyIssue("method", 'expected "POST" or "GET"'))
    if issues:
        raise _bad_request(issues)
    verb: Literal["POST", "GET"] = "GET" if method.upper() == "GET" else "POST"
    op = Redirect(call_id=call_id, url=url, method=verb, actions=actions)
    if await _command(request, op) is None:
        raise _ended(call_id, "redirected")
    return web.json_response({"call_id": call_id, "status": "redirected"})


async def _respond(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    body = _object_body(await _json_body(request), ("actions",))
    issues = check_actions(body.get("actions"), "actions")
    if issues:
        raise _bad_request(issues)
    if await _command(request, Respond(call_id=call_id, actions=body["actions"])) is None:
        raise _ended(call_id, "sent actions")
    return web.json_response({"call_id": call_id, "status": "accepted"})


async def _stream(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    body = _object_body(await _json_body(request), ("action", "name"))
    issues: list[BodyIssue] = []
    action, name = body.get("action"), body.get("name")
    if action != "stop":
        issues.append(BodyIssue("action", 'expected "stop"'))
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 128):
        issues.append(BodyIssue("name", "expected a stream name (1-128 characters)"))
    if issues:
        raise _bad_request(issues)
    result = await _command(request, StreamStop(call_id=call_id, name=name))
    if result is None:
        raise _ended(call_id, "sent a stream stop")
    return web.json_response(
        {"call_id": call_id, "status": "stopped", "stopped": int(result.get("stopped", 0))}
    )


# -- recordings --------------------------------------------------------------------------------


def _recording_file(request: web.Request, rec_id: str, rec: Recording | None) -> Path:
    if rec is not None and rec.path:
        return Path(rec.path)
    return _cfg(request).recordings_dir / f"{rec_id}.wav"


async def _recording(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    records = _records(request)
    recs = await records.recordings(call_id)
    if not recs:
        if await _known(request, call_id) is None:
            raise _not_found(call_id)
        raise ApiError(404, RECORDING_NOT_FOUND, f"call {call_id} has no recording")
    latest = recs[0]
    if latest.state == "in_progress":
        return web.json_response(
            {"retry_after_seconds": RECORDING_RETRY_S},
            status=202,
            headers={"Retry-After": str(RECORDING_RETRY_S)},
        )
    ready = next((r for r in recs if r.state == "ready"), None)
    if ready is None:
        raise ApiError(404, RECORDING_FAILED, f"call {call_id}'s recording was not saved")
    if not await asyncio.to_thread(_recording_file(request, ready.recording_id, ready).is_file):
        raise ApiError(404, RECORDING_NOT_FOUND, f"call {call_id}'s recording file is gone")
    signer = request.app[LINKS_KEY]
    # The link is on the address the client used to reach us (it can reach it again).
    link = signer.recording_link(str(request.url.origin()), ready.recording_id)
    return web.json_response(
        {"url": link, "recording_id": ready.recording_id, "expires_in_seconds": 900},
        status=302,
        headers={"Location": link, "Cache-Control": "no-store"},
    )


async def _serve(request: web.Request, rec_id: str) -> web.StreamResponse:
    if not _RECORDING_ID_RE.match(rec_id):
        raise ApiError(400, VALIDATION_BAD_REQUEST, "malformed recording id")
    rec = await _records(request).recording(rec_id)
    path = _recording_file(request, rec_id, rec)
    if not await asyncio.to_thread(path.is_file):
        raise ApiError(404, RECORDING_NOT_FOUND, f"recording {rec_id} not found")
    return web.FileResponse(path, headers={"Content-Type": "audio/wav"})


async def _signed_recording(request: web.Request) -> web.StreamResponse:
    """No bearer token here (outside /v1/): the link's signature is the credential."""
    rec_id = request.match_info["rid"]
    try:
        request.app[LINKS_KEY].verify(rec_id, request.query.get("exp"), request.query.get("sig"))
    except LinkError as err:
        code = RECORDING_EXPIRED if err.expired else AUTH_TOKEN_INVALID
        raise ApiError(403, code, str(err)) from None
    resp = await _serve(request, rec_id)
    resp.headers["Cache-Control"] = "private, no-store"
    return resp


async def _token_recording(request: web.Request) -> web.StreamResponse:
    return await _serve(request, request.match_info["rid"])
