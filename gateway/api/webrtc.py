"""Browser calling on the internal API: `POST /v1/webrtc/token` (the SDK's `webrtc.mintToken`),
`POST /internal/webrtc/check`, which the WebSocket front (Kamailio, http_client) calls for
every REGISTER and INVITE a browser sends, and the browser phone page under `/demo/phone`
(`POST /demo/phone/token` mints without the API token, in demo mode only).

Kamailio posts `token=<JWT>`; the check answers in plain text, for Kamailio's `{s.select}`:
`200` with `<identity> <number> <seconds left>`, or `401`/`403` with `<code> <message>`. It is on
loopback behind a per-run secret the node renders into Kamailio's config (`X-Front-Secret`).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from config.settings import Settings, is_loopback_host
from dsl.phone import InvalidNumber, parse_e164
from gateway.api.calls import _bad_request, _json_body
from gateway.api.errors import NUMBERS_NOT_FOUND, ApiError
from gateway.api.originate import BodyIssue
from gateway.webrtc.assets import CONTENT_TYPES, asset
from gateway.webrtc.tokens import IDENTITY_RE, ROLE_RE, TokenAuthority, TokenRefused

log = logging.getLogger(__name__)

TOKEN_PATH = "/v1/webrtc/token"
CHECK_PATH = "/internal/webrtc/check"
PAGE_PATH = "/demo/phone"
FRONT_SECRET_HEADER = "X-Front-Secret"
WEBRTC_DISABLED = "webrtc.disabled"
# A browser of the embedded demo calls from this number when the mint names none.
DEMO_CLIENT_NUMBER = "+254700000100"
_FIELDS = ("client_name", "role", "tenant_number_id", "phone_number")


@dataclass
class WebRtcService:
    settings: Settings
    authority: TokenAuthority
    front_secret: str
    # (method, result) once per check: the node's metrics
    observe: Callable[[str, str], None] = lambda _m, _r: None


SERVICE_KEY = web.AppKey("webrtc", WebRtcService)


def service_for(settings: Settings, front_secret: str,
                observe: Callable[[str, str], None] | None = None) -> WebRtcService:
    w = settings.webrtc
    keys = [(k.kid, k.secret.get_secret_value()) for k in w.keys]
    svc = WebRtcService(settings, TokenAuthority(keys, w.token_ttl_s), front_secret)
    if observe is not None:
        svc.observe = observe
    return svc


def setup_webrtc(app: web.Application, service: WebRtcService) -> None:
    app[SERVICE_KEY] = service
    app.router.add_post(TOKEN_PATH, _mint)
    app.router.add_post(CHECK_PATH, _check)
    # The browser phone (README "Call from a browser"); its token route only in demo mode.
    app.router.add_get(PAGE_PATH, _page)
    app.router.add_get(PAGE_PATH + "/{name}", _page)
    if service.settings.demo.enabled:
        app.router.add_post(PAGE_PATH + "/token", _demo_mint)


def _bound_number(settings: Settings, body: dict[str, Any]) -> str:
    """The number the client calls from: named by `phone_number` or `tenant_number_id`, one
    of this gateway's numbers (any E.164 when a control plane resolves numbers)."""
    numbers = {n.e164: n for n in settings.numbers}
    by_id = {n.number_id: n for n in settings.numbers}
    nid, phone = body.get("tenant_number_id"), body.get("phone_number")
    if nid is not None:
        if not isinstance(nid, str) or nid not in by_id:
            raise ApiError(422, NUMBERS_NOT_FOUND, f"tenant_number_id {nid!r}: no such number")
        number = by_id[nid].e164
        if phone is not None and phone != number:
            raise _bad_request([BodyIssue("phone_number", f"is not tenant_number_id's {number}")])
        return number
    if phone is not None:
        if not isinstance(phone, str):
            raise _bad_request([BodyIssue("phone_number", "expected an E.164 string")])
        try:
            number = parse_e164(phone)
        except InvalidNumber as e:
            raise _bad_request([BodyIssue("phone_number", e.reason)]) from None
        if number in numbers or settings.control_plane.resolve_url or settings.demo.enabled:
            return number
        raise ApiError(422, NUMBERS_NOT_FOUND, f"phone_number {number}: not a number of this "
                       "gateway ([[numbers]])")
    if len(settings.numbers) == 1:
        return settings.numbers[0].e164
    if settings.demo.enabled and not settings.numbers:
        return DEMO_CLIENT_NUMBER
    raise _bad_request([BodyIssue("phone_number", "required (or tenant_number_id): the number "
                                  "the client calls from")])


async def _mint(request: web.Request) -> web.Response:
    raw = await _json_body(request)
    return web.json_response(mint_reply(request.app[SERVICE_KEY], raw), status=201)


async def _demo_mint(request: web.Request) -> web.Response:
    """The demo page's token, without the API token: only in demo mode (a loopback-only
    development set-up, like the demo voice app)."""
    svc = request.app[SERVICE_KEY]
    if not is_loopback_host(request.remote):
        raise ApiError(403, "webrtc.demo_loopback_only",
                       "the demo page's token is for a browser on this machine only")
    # always a fresh name: a demo page never takes over another client's calls
    name = f"demo-{secrets.token_hex(4)}"
    return web.json_response(mint_reply(svc, {"client_name": name}), status=201)


async def _page(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name", "phone.html")
    path = asset(name)
    if path is None:
        hint = " (run scripts/setup.sh: it builds the JsSIP bundle)" if name == "jssip.js" else ""
        raise ApiError(404, "not_found", f"/demo/phone/{name}: no such file{hint}")
    return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES[name],
                                           "Cache-Control": "no-cache"})


def mint_reply(svc: WebRtcService, raw: Any) -> dict[str, Any]:
    """What `POST /v1/webrtc/token` answers (the SDK's `webrtc.mintToken` fields)."""
    s = svc.settings
    if not s.webrtc.enabled:
        raise ApiError(409, WEBRTC_DISABLED, "browser calling is off ([webrtc] enabled = false)")
    if not isinstance(raw, dict):
        raise _bad_request([BodyIssue("", "expected a JSON object")])
    issues = [BodyIssue(k, "unknown field") for k in raw if k not in _FIELDS]
    name = raw.get("client_name")
    if name is None:
        name = f"client-{secrets.token_hex(4)}"
    elif not isinstance(name, str) or not IDENTITY_RE.match(name):
        issues.append(BodyIssue("client_name", "1-64 of A-Z a-z 0-9 _ . -, starting with a "
                                "letter or digit"))
    role = raw.get("role", "client")
    if not isinstance(role, str) or not ROLE_RE.match(role):
        issues.append(BodyIssue("role", "1-32 of A-Z a-z 0-9 _ -"))
    if issues:
        raise _bad_request(issues)
    number = _bound_number(s, raw)
    token, claims = svc.authority.mint(str(name), number, str(role))
    domain = s.webrtc.domain
    log.info("webrtc: token for client:%s (number %s, role %s, key %s, %d s)", claims.identity,
             number, role, claims.kid, svc.authority.ttl_s)
    return {
        "token": token,
        "endpoint": s.webrtc.endpoint,
        "protocol": "sip",
        "clientName": claims.identity,
        "sipProfile": {
            "uri": f"sip:{claims.identity}@{domain}",
            "authorization_user": claims.identity,
            "realm": domain,
            "display_name": claims.identity,
        },
        "turnServer": s.webrtc.turn_server,
        "expiresIn": svc.authority.ttl_s,
    }


async def _check(request: web.Request) -> web.Response:
    svc = request.app[SERVICE_KEY]
    given = request.headers.get(FRONT_SECRET_HEADER, "")
    if not hmac.compare_digest(given.encode(), svc.front_secret.encode()):
        return web.Response(status=403, text="front_secret wrong front secret")
    method = request.query.get("method", "")[:16]
    user = request.query.get("user", "")[:128]
    # `token=<JWT>` (never empty: an empty POST body would go out as a GET)
    token = (await request.content.read(8192)).decode(errors="replace").removeprefix("token=")
    try:
        claims = svc.authority.verify(token)
        if user != claims.identity:  # an empty user too: a browser names itself
            raise TokenRefused("token_claims",
                               f"{method} as {user!r} with a token for {claims.identity!r}")
    except TokenRefused as e:
        log.warning("webrtc: %s of %r from %s refused %d: %s (%s)", method or "request", user,
                    request.headers.get("X-Source", "?"), e.status, e.message, e.code)
        svc.observe(method, e.code)
        return web.Response(status=e.status, text=f"{e.code} {e.message}")
    if method == "REGISTER":
        log.info("webrtc: REGISTER client:%s (number %s) for %d s", claims.identity,
                 claims.number, claims.remaining_s())
    svc.observe(method, "ok")
    return web.Response(text=f"{claims.identity} {claims.number} {claims.remaining_s()}")
