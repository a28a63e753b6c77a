"""Operator endpoints: /metrics (Prometheus) and /admin/drain (graceful drain before a restart).

`make_app(..., node=...)` registers them when it is given a `NodeControl` (the supervisor).
/admin/* needs the API bearer token (the auth middleware in app.py); /metrics does not.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Protocol

from aiohttp import web

from gateway.api.errors import VALIDATION_BAD_REQUEST, ApiError
from gateway.metrics import CONTENT_TYPE

__all__ = ["MAX_DRAIN_WAIT_S", "NODE_KEY", "NodeControl", "setup_admin"]

MAX_DRAIN_WAIT_S = 3600.0
# How often a waiting drain request looks at the active call count.
POLL_INTERVAL_S = 0.1
_WAIT_RE = re.compile(r"^[0-9]{1,7}(\.[0-9]{1,6})?$")  # plain decimal seconds: no sign/exp/nan


class NodeControl(Protocol):
    """What the API needs from the supervisor for metrics and draining."""

    def metrics_text(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of the node's metrics."""

    async def refresh_metrics(self) -> None:
        """Bring what `metrics_text` renders up to date (bounded in time); before each scrape."""

    @property
    def ready(self) -> bool:
        """True once the node can take calls: outbox recovery done, every worker ready, the SIP
        front up. False before that and again while the node stops."""

    @property
    def draining(self) -> bool:
        """True from drain() until undrain(): the node refuses new calls."""

    def unready_reason(self) -> str | None:
        """Why the node cannot take calls now ("not_started", "draining", "stopping",
        "front_down", "outbox_down", "no_workers"); None when it can. /readyz answers 503
        with it."""

    async def drain(self) -> None:
        """Stop taking new calls (calls in progress go on). Idempotent."""

    async def undrain(self) -> None:
        """Take new calls again. Idempotent."""

    def active_call_count(self) -> int:
        """Calls in progress on the node, over all workers."""


NODE_KEY = web.AppKey("node", NodeControl)


def _node(request: web.Request) -> NodeControl:
    return request.app[NODE_KEY]


def _parse_wait(request: web.Request) -> float | None:
    values = request.query.getall("wait", [])
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, VALIDATION_BAD_REQUEST, "give wait at most once")
    raw = values[0]
    if not _WAIT_RE.match(raw) or float(raw) > MAX_DRAIN_WAIT_S:
        raise ApiError(
            400,
            VALIDATION_BAD_REQUEST,
            f"wait must be a number of seconds from 0 to {MAX_DRAIN_WAIT_S:g}, not {raw[:40]!r}",
        )
    return float(raw)


async def _metrics(request: web.Request) -> web.Response:
    node = _node(request)
    await node.refresh_metrics()
    text = node.metrics_text()
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


async def _post_drain(request: web.Request) -> web.Response:
    wait = _parse_wait(request)  # before draining: a bad request changes nothing
    node = _node(request)
    await node.drain()
    if wait is None:
        return web.json_response(
            {"draining": True, "active_calls": node.active_call_count()}, status=202
        )
    deadline = time.monotonic() + wait
    # Polling: NodeControl has no "calls changed" signal, and a count every 0.1 s is cheap.
    while (  # noqa: ASYNC110
        (active := node.active_call_count()) > 0
        and node.draining  # an undrain meanwhile ends the wait: nothing left to wait for
        and (left := deadline - time.monotonic()) > 0
    ):
        await asyncio.sleep(min(POLL_INTERVAL_S, left))
    draining = node.draining
    drained = draining and active == 0
    return web.json_response(
        {"draining": draining, "active_calls": active, "drained": drained},
        status=200 if drained else 202,
    )


async def _get_drain(request: web.Request) -> web.Response:
    node = _node(request)
    draining, active = node.draining, node.active_call_count()
    return web.json_response(
        {"draining": draining, "active_calls": active, "drained": draining and active == 0}
    )


async def _delete_drain(request: web.Request) -> web.Response:
    node = _node(request)
    await node.undrain()
    return web.json_response({"draining": node.draining, "active_calls": node.active_call_count()})


def setup_admin(app: web.Application, node: NodeControl) -> None:
    app[NODE_KEY] = node
    # /metrics is open, like /healthz: Prometheus scrapes it on the internal network, where
    # this API listens (api.listen); it shows counts and latencies, no call details or secrets.
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/admin/drain", _post_drain)
    app.router.add_get("/admin/drain", _get_drain)
    app.router.add_delete("/admin/drain", _delete_drain)
