"""The event path end to end: Outbox -> Deliverer -> a real aiohttp receiver on 127.0.0.1."""

import asyncio
import itertools
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.events.delivery import Deliverer
from gateway.events.envelope import make_event
from gateway.events.outbox import Outbox
from tests.seed_receiver import verify_signature

pytestmark = pytest.mark.integration

SECRET = "whsec_integration_secret"
REPO = Path(__file__).resolve().parents[2]
UNIT = 0.05  # backoff unit: the real schedule, 20x faster




@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    sig_ok: bool
    status: int = 0

    @property
    def event_id(self) -> str:
        return str(json.loads(self.body)["event_id"])

    @property
    def t(self) -> int:
        return int(self.headers["X-Sautikit-Signature"].split(",")[0].removeprefix("t="))


class Receiver:
    """A webhook endpoint whose answer per request is decided by `respond(hit) -> status`."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.respond: Callable[[Hit], int | None] = lambda hit: 200  # None = hang
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_signature(body, request.headers.get("X-Sautikit-Signature", ""), SECRET)
            ok = True
        except ValueError:
            ok = False
        hit = Hit(request.path, dict(request.headers), body, time.time(), ok)
        self.hits.append(hit)
        status = self.respond(hit)
        if status is None:
            hit.status = -1
            await asyncio.wait_for(self.release.wait(), 30)
            return web.Response(status=200)
        hit.status = status
        return web.Response(
            status=status,
            text="nope" if status >= 300 else "ok",
            headers={"Location": "/ok"} if 300 <= status < 400 else None,
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, path: str = "/events") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accepted(self) -> list[Hit]:
        return [h for h in self.hits if 200 <= h.status < 300]

    def for_event(self, event_id: str) -> list[Hit]:
        return [h for h in self.hits if h.event_id == event_id]


async def wait_until(cond: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def receiver():
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def outbox(tmp_path):
    ob = Outbox(tmp_path / "outbox.sqlite3")
    yield ob
    ob.close()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


class Running:
    def __init__(self, deliverer: Deliverer) -> None:
        self.deliverer = deliverer
        self.task = asyncio.create_task(deliverer.run())

    async def stop(self) -> None:
        await asyncio.wait_for(self.deliverer.stop(), 5)
        await self.task


@pytest.fixture
async def start_deliverer(outbox, session):
    running: list[Running] = []

    def start(**kw) -> Deliverer:
        kw = {"backoff_unit_s": UNIT, "poll_interval_s": 0.2, **kw}
        r = Running(Deliverer(outbox, session, **kw))
        running.append(r)
        return r.deliverer

    yield start
    for r in running:
        await r.stop()


def append(
    ob: Outbox,
    url: str,
    *,
    policy="control_plane",
    kind="call.completed",
    n=1,
    call_prefix="call",
    final=False,
):
    events = []
    for i in range(n):
        ev = make_event(kind, "ws-1", {"call_id": f"{call_prefix}-{i}", "duration_seconds": i})
        assert ob.append(
            ev, url=url, secret=SECRET, policy=policy, call_id=f"{call_prefix}-{i}", final=final
        )
        events.append(ev)
    return events


async def test_delivers_signed_events_with_headers(outbox, receiver, start_deliverer):
    events = append(outbox, receiver.url(), n=3, final=True)
    d = start_deliverer()
    d.notify()
    await wait_until(lambda: outbox.counts()["delivered"] == 3, 5)
    assert len(receiver.hits) == 3
    by_id = {e.event_id: e for e in events}
    for hit in receiver.hits:
        ev = by_id[hit.event_id]
        assert hit.sig_ok
        assert hit.body == ev.body
        assert hit.headers["Content-Type"] == "application/json"
        assert hit.headers["X-Sautikit-Idempotency-Key"] == ev.event_id
        assert hit.headers["X-Sautikit-Event"] == "call.completed"
        assert abs(hit.t - time.time()) < 5
    rows = outbox.rows_for_call("call-0")
    assert rows[0].state == "delivered" and rows[0].attempts == 1


async def test_picks_up_rows_appended_by_another_process(
    tmp_path, outbox, receiver, start_deliverer
):
    start_deliverer(poll_interval_s=0.1)
    await asyncio.sleep(0.05)
    with Outbox(tmp_path / "outbox.sqlite3") as writer:  # a worker's own connection; no notify
        append(writer, receiver.url(), n=2)
    await wait_until(lambda: outbox.counts()["delivered"] == 2, 3)


async def test_outage_then_recovery_loses_nothing(outbox, receiver, start_deliverer):
    port = receiver.port
    await receiver.stop()  # connections refused from now on
    events = append(outbox, receiver.url(), n=20)
    start_deliverer(control_plane_cap_s=8)  # waits 0.05, 0.1, 0.2, 0.4, 0.4 ...
    await wait_until(lambda: all(r.attempts >= 3 for r in outbox.due(time.time() + 60, 100)), 5)
    assert outbox.counts()["pending"] == 20
    refused = outbox.due(time.time() + 60, 1)[0].last_error or ""
    assert "connect" in refused.lower()

    # back up, but overloaded (503) for a while that spans a change of the signature's second
    receiver.release = asyncio.Event()
    receiver.port = port
    up_at = time.time()
    receiver.respond = lambda hit: 503 if hit.at < up_at + 1.2 else 200
    await receiver.start()

    await wait_until(lambda: outbox.counts()["delivered"] == 20, 10)
    assert outbox.counts() == {"pending": 0, "delivered": 20, "dead_letter": 0}
    assert {h.event_id for h in receiver.accepted()} == {e.event_id for e in events}
    for ev in events:
        hits = receiver.for_event(ev.event_id)
        assert any(h.status == 503 for h in hits)
        assert all(h.body == ev.body for h in hits)  # never re-serialised
        assert all(h.sig_ok for h in hits)  # each attempt freshly and validly signed
        if hits[-1].at - hits[0].at > 1.05:
            assert hits[-1].t > hits[0].t
    spans = [
        max(h.t for h in receiver.for_event(e.event_id))
        - min(h.t for h in receiver.for_event(e.event_id))
        for e in events
    ]
    assert max(spans) >= 1  # t differs between attempts


async def test_customer_dead_letter_after_five_attempts_then_retry(
    outbox, receiver, start_deliverer, caplog
):
    caplog.set_level(logging.WARNING, logger="gateway.events.delivery")
    receiver.respond = lambda hit: None if hit.path == "/stall" else 500
    (ev,) = append(outbox, receiver.url("/hook?token=t0k"), policy="customer", kind="call.failed")
    # an attempt stuck in flight elsewhere must not blur the schedule to the poll interval
    append(outbox, receiver.url("/stall"), call_prefix="stall")
    d = start_deliverer(poll_interval_s=1.0)
    d.notify()
    await wait_until(lambda: outbox.counts()["dead_letter"] == 1, 5)
    await asyncio.sleep(0.3)  # nothing more follows
    hook = [h for h in receiver.hits if h.path == "/hook"]
    assert len(hook) == 5
    (row,) = outbox.dead_letters()
    assert row.attempts == 5 and row.last_error == "HTTP 500: nope"
    gaps = [b.at - a.at for a, b in itertools.pairwise(hook)]
    for gap, want in zip(gaps, [1, 2, 4, 8], strict=True):
        assert want * UNIT * 0.9 <= gap <= want * UNIT + 0.25, gaps

    (warn,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    msg = warn.getMessage()
    assert ev.event_id in msg and "call.failed" in msg and "HTTP 500" in msg
    assert f"127.0.0.1:{receiver.port}/hook" in msg
    assert SECRET not in msg and "t0k" not in msg

    receiver.respond = lambda hit: 200
    assert outbox.retry(ev.event_id)
    d.notify()
    await wait_until(lambda: outbox.counts()["delivered"] == 1, 3)
    hook = [h for h in receiver.hits if h.path == "/hook"]
    assert len(hook) == 6 and hook[-1].body == ev.body and hook[-1].sig_ok
    receiver.release.set()


async def test_control_plane_permanent_vs_retryable(outbox, receiver, start_deliverer):
    plan: dict[str, list[int | None]] = {
        "/e400": [400],
        "/e404": [404],
        "/e429": [429, 429],
        "/e500": [500, 502],
        "/e408": [408],
        "/c400": [400],
        "/slow": [None],
    }

    def respond(hit: Hit) -> int | None:
        seen = sum(1 for h in receiver.hits if h.path == hit.path) - 1
        script = plan.get(hit.path, [])
        return script[seen] if seen < len(script) else 200

    receiver.respond = respond
    ids = {}
    for path in plan:
        policy = "customer" if path.startswith("/c") else "control_plane"
        (ev,) = append(outbox, receiver.url(path), policy=policy, call_prefix=path)
        ids[path] = ev.event_id
    (redirected,) = append(outbox, receiver.url("/r302"), policy="customer", call_prefix="r")
    plan["/r302"] = [302] * 10
    start_deliverer(timeout_s=0.4).notify()

    await wait_until(
        lambda: outbox.counts()["delivered"] == 5 and outbox.counts()["dead_letter"] == 3, 8
    )

    def row(path):
        r = outbox.get(ids[path])
        assert r is not None
        return r

    assert (row("/e400").state, row("/e400").attempts) == ("dead_letter", 1)
    assert (row("/e404").state, row("/e404").attempts) == ("dead_letter", 1)
    assert (row("/e429").state, row("/e429").attempts) == ("delivered", 3)
    assert (row("/e500").state, row("/e500").attempts) == ("delivered", 3)
    assert (row("/e408").state, row("/e408").attempts) == ("delivered", 2)
    assert (row("/slow").state, row("/slow").attempts) == ("delivered", 2)
    # customers: any non-2xx is one failed attempt of five, even a 400
    assert (row("/c400").state, row("/c400").attempts) == ("delivered", 2)
    # redirects are not followed: five 302s and the customer row is dead
    r = outbox.get(redirected.event_id)
    assert r is not None and r.state == "dead_letter" and r.attempts == 5
    assert not any(h.path == "/ok" for h in receiver.hits)


_CHILD = """
import asyncio, sys
import aiohttp
from gateway.events.delivery import Deliverer
from gateway.events.outbox import Outbox

async def main():
    ob = Outbox(sys.argv[1])
    async with aiohttp.ClientSession() as s:
        d = Deliverer(ob, s, max_in_flight=4, backoff_unit_s=0.05, poll_interval_s=0.05,
                      timeout_s=30)
        await d.run()

asyncio.run(main())
"""


async def test_sigkilled_deliverer_loses_nothing(tmp_path, outbox, receiver, start_deliverer):
    n = 30
    events = append(outbox, receiver.url(), n=n, final=True)
    # the first five are accepted, then the receiver stalls: the child has attempts in flight
    receiver.respond = lambda hit: 200 if len(receiver.hits) <= 5 else None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(tmp_path / "outbox.sqlite3"), cwd=REPO, env=env
    )
    try:
        await wait_until(lambda: sum(h.status == -1 for h in receiver.hits) >= 4, 15)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    counts = outbox.counts()
    assert counts["delivered"] == 5 and counts["pending"] == n - 5

    receiver.respond = lambda hit: 200
    receiver.release.set()  # the stalled answers go to a dead socket
    start_deliverer().notify()
    await wait_until(lambda: outbox.counts()["delivered"] == n, 10)
    assert {h.event_id for h in receiver.accepted()} == {e.event_id for e in events}
    db = sqlite3.connect(tmp_path / "outbox.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


async def test_stop_lets_in_flight_attempts_finish(outbox, receiver, session):
    receiver.respond = lambda hit: None  # hang until released
    append(outbox, receiver.url(), n=2)
    d = Deliverer(outbox, session, backoff_unit_s=UNIT, poll_interval_s=0.05, timeout_s=5)
    task = asyncio.create_task(d.run())
    await wait_until(lambda: d.in_flight == 2, 3)
    stopper = asyncio.create_task(d.stop())
    await asyncio.sleep(0.1)
    assert not stopper.done()
    receiver.release.set()
    await asyncio.wait_for(stopper, 5)
    await task
    assert outbox.counts()["delivered"] == 2


async def test_notified_rows_are_delivered_once_without_rescanning_due(
    tmp_path, outbox, receiver, session, monkeypatch
):
    """The supervisor hears of every stored event: each notify looks only at rows appended
    since the last look, not at every due row again; each is delivered exactly once."""
    from gateway.events.outbox import AsyncOutbox

    scans = 0
    due = Outbox.due

    def counting_due(self, now, limit):
        nonlocal scans
        scans += 1
        return due(self, now, limit)

    monkeypatch.setattr(Outbox, "due", counting_due)
    store = await AsyncOutbox.open(tmp_path / "outbox.sqlite3")
    d = Deliverer(store, session, backoff_unit_s=UNIT, poll_interval_s=0.5)
    task = asyncio.create_task(d.run())
    t0 = time.monotonic()
    ids = []
    for i in range(60):
        ev = make_event("call.completed", "ws-1", {"call_id": f"n-{i}"})
        assert await store.append(ev, url=receiver.url(), secret=SECRET, policy="control_plane",
                                  call_id=f"n-{i}", final=True)
        ids.append(ev.event_id)
        d.notify()
        await asyncio.sleep(0.005)
    await wait_until(lambda: outbox.counts()["delivered"] == 60, 10)
    elapsed = time.monotonic() - t0
    await asyncio.wait_for(d.stop(), 5)
    await task
    await store.aclose()
    assert sorted(h.event_id for h in receiver.hits) == sorted(ids)  # once each
    # the start and one a second, not one per notify (113 for these 60 before)
    assert scans <= 2 + elapsed, (scans, elapsed)


async def test_rows_in_backoff_stay_bounded_in_memory(outbox, receiver, start_deliverer):
    """A long outage: what the deliverer holds stays within max_known; the rest waits on disk."""
    receiver.respond = lambda hit: 503
    append(outbox, receiver.url(), n=80)
    d = start_deliverer(max_known=16, max_in_flight=4, poll_interval_s=0.1)
    held: list[int] = []
    deadline = time.monotonic() + 3.5  # three full rescans (every 1 s)
    while time.monotonic() < deadline:
        held.append(len(d._known) + len(d._in_flight))
        await asyncio.sleep(0.01)
    assert len(receiver.hits) > 16  # it kept trying
    assert max(held) <= 16, max(held)
    assert len(d._due) <= 2 * 16 + 64
