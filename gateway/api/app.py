"""The supervisor's internal HTTP API.

Everything under /v1/ and /admin/ needs the bearer token (enforced by middleware, so new
routes there are protected by default); /healthz, /readyz, /metrics, /demo/* and the signed
recording links (/recordings/*, their signature checked by the handler) are open.
/metrics and /admin/drain exist when `make_app` is given the node (`NodeControl`, see
gateway/api/admin.py). The calls API is gateway/api/calls.py. To add routes, write a
`setup_*` function like `setup_calls` and call it from `make_app`.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from config.settings import Settings, parse_hostport
from gateway.api.admin import NODE_KEY, NodeControl, setup_admin
from gateway.api.calls import CONTROL_KEY, LINKS_KEY, setup_calls
from gateway.api.errors import API_KEY_INVALID, ApiError, Handler, error_middleware
from gateway.api.supervision import setup_supervision
from gateway.api.webrtc import WebRtcService, setup_webrtc
from gateway.calls.control import CallControl
from gateway.calls.links import LinkSigner, signer_for
from gateway.calls.records import CallRecords
from gateway.supervision.registry import Supervisions

__all__ = [
    "CONTROL_KEY",
    "LINKS_KEY",
    "NODE_KEY",
    "RECORDINGS_DIR_KEY",
    "SETTINGS_KEY",
    "CallControl",
    "NodeControl",
    "make_app",
    "start_api",
]

log = logging.getLogger(__name__)

SETTINGS_KEY = web.AppKey("settings", Settings)
RECORDINGS_DIR_KEY = web.AppKey("recordings_dir", Path)

_AUTH_PREFIXES = ("/v1/", "/admin/")


def _auth_middleware(token: str, cluster_token: str | None = None) -> Middleware:
    api_token = token.encode()
    # /cluster/ (node to node) takes the cluster's token only; without a cluster, nothing does
    node_token = (cluster_token or secrets.token_hex(32)).encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        cluster = request.path.startswith("/cluster/")
        if cluster or request.path.startswith(_AUTH_PREFIXES):
            expected = node_token if cluster else api_token
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: no timing oracle on the token's prefix.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                raise ApiError(
                    401,
                    API_KEY_INVALID,
                    "missing or invalid API token (Authorization: Bearer <token>)",
                    {"WWW-Authenticate": 'Bearer realm="sautikit-gateway"'},
                )
        return await handler(request)

    return auth


async def _healthz(request: web.Request) -> web.Response:
    body: dict[str, Any] = {"status": "ok"}
    node = request.app.get(NODE_KEY)
    if node is not None:
        # Still 200 "ok" while starting or draining: the process is healthy (liveness); whether
        # it takes calls is `accepting_calls`, and /readyz answers that with its status code.
        ready, draining = node.ready, node.draining
        body |= {"ready": ready, "draining": draining, "accepting_calls": ready and not draining}
    return web.json_response(body)


async def _readyz(request: web.Request) -> web.Response:
    """200 while the node takes calls; 503 with the reason while it starts (until every worker
    and the SIP front are up), drains or stops, and when its front or all its workers are down.
    Load balancers and harnesses read the status code before sending calls."""
    node = request.app.get(NODE_KEY)
    if node is None:
        return web.json_response({"ready": True})
    reason = node.unready_reason()
    if reason is not None:
        return web.json_response({"ready": False, "reason": reason}, status=503)
    return web.json_response({"ready": True})


async def start_api(app: web.Application, settings: Settings) -> web.AppRunner:
    """Serve `app` on `api.listen`, with the connection limits of `[api]`.

    aiohttp's keep-alive timer runs from the moment a connection opens and is not reset by
    bytes that do not complete a request, so `idle_timeout_s` is also the deadline for a
    request's line and headers (a slowloris or a silent socket); a handler already running
    (e.g. /admin/drain?wait=) is not cut by it.
    """
    api = settings.api
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=api.idle_timeout_s)
    await runner.setup()
    server = runner.server
    assert server is not None
    accept = server.connection_made
    warned_at = 0.0

    def connection_made(handler: Any, transport: Any) -> None:
        nonlocal warned_at
        accept(handler, transport)
        if len(server.connections) > api.max_connections:
            transport.close()  # connection_lost then unregisters it
            now = time.monotonic()
            if now - warned_at > 10:
                warned_at = now
                log.warning(
                    "internal API: %d connections open (api.max_connections); closing new ones",
                    api.max_connections,
                )

    server.connection_made = connection_made  # type: ignore[method-assign]
    host, port = parse_hostport(api.listen)
    await web.TCPSite(runner, host, port).start()
    return runner


def make_app(
    settings: Settings,
    control: CallControl,
    recordings_dir: Path,
    node: NodeControl | None = None,
    *,
    records: CallRecords | None = None,
    links: LinkSigner | None = None,
    supervisions: Supervisions | None = None,
    webrtc: WebRtcService | None = None,
) -> web.Application:
    """The API app. `control` places and steers calls (the node); `records` is the call record
    store the node also writes (None: the app opens `storage.dir/calls.sqlite3` itself and
    closes it on cleanup); `links` signs recording links (None: the key in `storage.dir`)."""
    app = web.Application(
        middlewares=[
            error_middleware,  # outermost: every error, auth's included, gets the envelope
            _auth_middleware(
                settings.api.token.get_secret_value(),
                settings.cluster.token.get_secret_value() if settings.cluster.token else None,
            ),
        ]
    )
    app[SETTINGS_KEY] = settings
    app[RECORDINGS_DIR_KEY] = recordings_dir
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    setup_calls(
        app,
        settings=settings,
        control=control,
        records=records,
        links=links if links is not None else signer_for(settings.storage.dir),
        recordings_dir=recordings_dir,
    )
    if supervisions is not None:
        setup_supervision(app, supervisions, clients=webrtc is not None)
    if node is not None:
        setup_admin(app, node)
        rooms = getattr(node, "rooms", None)
        if rooms is not None:  # the node's conference rooms (gateway/api/conferences.py)
            from gateway.api.conferences import setup_conferences

            setup_conferences(app, rooms)
    if webrtc is not None:
        setup_webrtc(app, webrtc)
    if settings.demo.enabled:
        from gateway.api.demo import setup_demo  # numpy: only where the demo runs

        setup_demo(app, base_url=settings.api.base_url, clock_rate=settings.media.clock_rate)
    return app
