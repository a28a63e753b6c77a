"""The node supervisor: internal API, event delivery, and the worker processes that hold calls.

A worker that dies costs only its own calls: each still gets its final event (`call.failed`,
reason `worker_lost`; the outbox keeps it to one final event per call) and the worker restarts.
A node that dies whole leaves its calls open in the outbox: the next start on the same storage
closes them (`call.failed`, reason `node_lost`, see gateway/events/recovery.py) before it takes
a call. One node per storage dir: the supervisor holds an exclusive lock on `node.lock`, and its
workers inherit that lock, so a restarted node also waits for a dead supervisor's last workers.
With `[workers] start = "fork"` the workers are forked by the fork server (gateway/forkserver.py),
which inherits the lock from the supervisor and hands it on to each worker the same way; while
the fork server is down (it is restarted) workers are spawned as with `start = "spawn"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import secrets
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client import Counter

from config.settings import ConfigError, Settings, load_settings, parse_hostport
from gateway.api.app import make_app, start_api
from gateway.api.webrtc import CHECK_PATH as WEBRTC_CHECK_PATH
from gateway.api.webrtc import WebRtcService, service_for
from gateway.calls.directory import CallDirectory
from gateway.calls.identity import CallIdentity
from gateway.calls.lost import write_lost_call
from gateway.calls.records import CallRecords
from gateway.calls.switchboard import Switchboard
from gateway.cluster.membership import Cluster
from gateway.control.errors import FAILED, OpRefused
from gateway.dial.placement import DialPlacement
from gateway.events.delivery import Deliverer
from gateway.events.outbox import AsyncOutbox
from gateway.events.recovery import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_NAME,
    Heartbeat,
    close_open_calls,
    read_heartbeat,
    write_heartbeat,
)
from gateway.forkserver import ForkedProcess, ForkServer, ForkServerUnavailable
from gateway.kamailio import KamailioConfig, KamailioFront, WebRtcFront, front_limits
from gateway.metrics import NodeMetrics
from gateway.plan import NodePlan, WorkerPlace, plan_node
from gateway.rooms.registry import RoomRegistry
from gateway.routing import Router, set_default_region
from gateway.supervision.legs import NodeSupervisionLegs
from gateway.webrtc.rtpengine import Rtpengine, RtpengineConfig
from gateway.webrtc.tokens import TokenAuthority
from gateway.workers import protocol as msgs
from gateway.workers.ipc import Channel, Requester, open_channel

log = logging.getLogger(__name__)

# (worker index, op) -> the Reply's result; raises OpRefused to refuse
AskHandler = Callable[[int, Any], Awaitable[dict[str, Any]]]

LOCK_NAME = "node.lock"
# A dead supervisor's workers end their calls (up to ~15 s) before the lock is free.
LOCK_WAIT_S = 30.0
METRICS_WAIT_S = 1.0  # a scrape waits this long for fresh outbox counts, else shows the last
SPAWN_WAVE = 2 * (os.cpu_count() or 1)  # spawned workers importing at once


@dataclass
class WorkerHandle:
    place: WorkerPlace  # where it listens and how many calls it takes (gateway/plan.py)
    proc: asyncio.subprocess.Process | ForkedProcess | None = None
    channel: Channel[msgs.FromWorker] | None = None
    requester: Requester | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0

    @property
    def index(self) -> int:
        return self.place.index

    @property
    def uri(self) -> str:
        return self.place.uri

    @property
    def max_calls(self) -> int:
        return self.place.max_calls

    @property
    def admit(self) -> int:
        return self.place.admit


class Node:
    def __init__(
        self, settings: Settings, config_path: Path | None, forkserver: ForkServer | None = None
    ) -> None:
        self.settings = settings
        set_default_region(settings.routing.default_region)  # API numbers, `dial` in documents
        self.config_path = config_path
        self.storage = settings.storage.dir
        self.workers: list[WorkerHandle] = []
        self.stopping = False
        self.draining = False
        self.started = False  # recovery done, workers ready, front up: see `ready`
        self.front: Any = None  # KamailioFront when the node manages its SIP front
        self.plan: NodePlan | None = None
        self.directory = CallDirectory()
        self.router: Router | None = None
        self.switchboard: Switchboard | None = None
        self.dial: DialPlacement | None = None  # dial legs between workers
        self.supervision: NodeSupervisionLegs | None = None  # supervisors on bridged calls
        self.records: CallRecords | None = None
        # Browser calling: token checks for the front, rtpengine for the media.
        self.webrtc: WebRtcService | None = None
        self.rtpengine: Rtpengine | None = None
        self.metrics = NodeMetrics(
            calls=self.active_calls,
            workers=lambda: [
                (w.index, w.ready.is_set() and w.channel is not None) for w in self.workers
            ],
            outbox_counts=self._outbox_counts,
        )
        self.outbox: AsyncOutbox | None = None
        self._counts: dict[str, int] | None = None  # the outbox's, as of the last look
        self._counting: asyncio.Future[dict[str, int]] | None = None
        self.deliverer: Deliverer | None = None
        self.runner: web.AppRunner | None = None
        self.http: ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # What workers may ask of the supervisor (protocol.Ask): op type -> handler, added by
        # the places that span processes (see `handle_asks`).
        self._ask_handlers: dict[type[Any], AskHandler] = {}
        self._asking: set[asyncio.Task[None]] = set()
        # Conference rooms: joins and leaves are workers' asks (gateway/rooms/registry.py).
        # With a [cluster], rooms span nodes (gateway/cluster/): a room's home holds its registry.
        self.cluster = Cluster(settings.cluster) if settings.cluster.enabled else None
        self.rooms = RoomRegistry(self._requester, self.cluster)
        self.rooms.install(self)
        self._lock_fd: int | None = None
        # Launched already (gateway/cli.py does, before importing this module) or by start().
        self.forkserver = forkserver
        # Spawned workers start a few at a time: 150 interpreters importing at once on 2 cores
        # all finish late together (none was ready after 255 s, bench/node_start.py) and starve
        # the machine. Forked ones all at once: the fork server forks one at a time anyway,
        # and waves of 8 measured slower to the last worker ready.
        self._spawning = asyncio.Semaphore(SPAWN_WAVE)
        self._run_started = time.time()
        self.recovered = Counter(
            "sautikit_calls_recovered_total",
            "Calls a crashed node left open, closed at start as call.failed node_lost.",
            registry=self.metrics.registry,
        )
        w = settings.webrtc
        if w.enabled:
            self.webrtc = service_for(settings, secrets.token_urlsafe(24),
                                      self.metrics.webrtc_check)
            host, _ = parse_hostport(w.ws_listen)
            self.rtpengine = Rtpengine(RtpengineConfig(
                address=w.rtp_address or ("127.0.0.1" if host in ("0.0.0.0", "::") else host),
                ng_port=w.rtpengine_ng_port, port_min=w.rtp_port_min, port_max=w.rtp_port_max,
                binary=w.rtpengine_binary,
            ))

    # -- CallRegistry for the API -----------------------------------------------------------
    def active_calls(self) -> list[dict[str, Any]]:
        return self.directory.summaries()

    def _requester(self, index: int) -> Requester | None:
        if 0 <= index < len(self.workers):
            return self.workers[index].requester
        return None

    # -- NodeControl for the API ------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.started and not self.stopping

    def unready_reason(self) -> str | None:
        """Why /readyz answers 503 now; None: the node takes calls. Every worker must be up
        before the node is first ready; after that one worker restarting does not take the
        node out of its load balancer (its share goes to the others), none being up does."""
        if self.stopping:
            return "stopping"
        if not self.started:
            return "not_started"
        if self.draining:
            return "draining"
        if self.front is not None and not self.front.running:
            return "front_down"
        if self.outbox is not None and self.outbox.committer.dead:
            return "outbox_down"  # nothing could be stored or delivered
        if not any(w.ready.is_set() and w.channel is not None for w in self.workers):
            return "no_workers"
        return None

    def metrics_text(self) -> str:
        return self.metrics.render()

    def _outbox_counts(self) -> dict[str, int] | None:
        """For the synchronous render: the counts `refresh_metrics` last got."""
        return self._counts

    async def refresh_metrics(self) -> None:
        """Before /metrics renders: the outbox counted now, on the writer thread (never SQLite
        on the loop); waited for at most METRICS_WAIT_S, else the last counts stand (a scrape
        that times out leaves its look running for the next one)."""
        if self.front is not None and self.webrtc is not None and self.front.running:
            try:
                n = await asyncio.wait_for(self.front.registrations(), METRICS_WAIT_S)
                self.metrics.webrtc_registrations.set(n)
            except Exception as e:  # a scrape never fails for this
                log.warning("metrics: browser registrations unknown: %r", e)
        if self.outbox is None:
            return
        if self._counting is None or self._counting.done():
            try:
                self._counting = fut = self.outbox.counts()
            except RuntimeError:  # closed
                return
            fut.add_done_callback(self._counted)
        with contextlib.suppress(TimeoutError, RuntimeError, sqlite3.Error):
            await asyncio.wait_for(asyncio.shield(self._counting), METRICS_WAIT_S)

    def _counted(self, fut: asyncio.Future[dict[str, int]]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._counts = fut.result()

    def active_call_count(self) -> int:
        return self.directory.count()

    async def drain(self) -> None:
        """Stop taking new calls (workers answer 503; the front stops sending them any)."""
        await self._set_draining(True)

    async def undrain(self) -> None:
        await self._set_draining(False)

    async def _set_draining(self, on: bool) -> None:
        self.draining = on
        self.metrics.set_draining(on)
        for w in self.workers:
            if w.channel is not None:
                w.channel.send(msgs.Drain(on=on))
        if self.front is not None:
            for w in self.workers:
                await self.front.set_state(w.uri, not on)
        log.warning(
            "node %s: %d call(s) active",
            "draining" if on else "accepting calls again",
            self.active_call_count(),
        )

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        for sub in ("recordings", "cache"):
            (self.storage / sub).mkdir(parents=True, exist_ok=True)
        await self._lock_storage()
        if self.settings.workers.start == "fork":
            if self.forkserver is None:  # first: its imports overlap the rest of the start
                self.forkserver = ForkServer(self.config_path)
            assert self._lock_fd is not None
            self.forkserver.set_lock(self._lock_fd)  # before any fork: workers inherit it
            self._tasks.append(asyncio.create_task(self.forkserver.run(), name="forkserver"))
        elif self.forkserver is not None:
            await self.forkserver.stop()
            self.forkserver = None
        # Every outbox read and write of this process goes through its writer thread.
        self.outbox = await AsyncOutbox.open(self.storage / "outbox.sqlite3")
        # Before any worker runs: every open call in the outbox was left by a dead node.
        heartbeat_path = self.storage / HEARTBEAT_NAME
        last_run = await asyncio.to_thread(read_heartbeat, heartbeat_path)
        now = time.time()
        closed = await self.outbox.run(
            lambda ob: close_open_calls(ob, last_run, now), "close open calls"
        )
        self._counts = await self.outbox.counts()
        if closed:
            log.warning("closed %d call(s) left open by the previous run (node_lost)", len(closed))
            self.recovered.inc(len(closed))
            for _ in closed:
                self.metrics.call_final("failed")
        self._tasks.append(asyncio.create_task(self._heartbeat(heartbeat_path), name="heartbeat"))
        self.http = ClientSession(timeout=ClientTimeout(total=self.settings.callbacks.timeout_s))
        self.deliverer = Deliverer(self.outbox, self.http)
        self.router = Router(self.settings, self.http)
        self.switchboard = Switchboard(
            self.settings, self.directory, self.router, self._requester,
            draining=lambda: self.draining or self.stopping,
        )
        self.switchboard.register_metrics(self.metrics.registry)
        self.dial = DialPlacement(
            self.directory, self.switchboard.trunks, self._requester,
            client_domain=self.settings.webrtc.domain if self.webrtc is not None else None,
            on_client_leg=lambda: self.metrics.webrtc_call("to_browser"),
        )
        self.dial.register(self.handle_asks)
        self.supervision = NodeSupervisionLegs(
            self.directory, self._requester, lambda: self.outbox,
            notify=lambda: self.deliverer.notify() if self.deliverer is not None else None,
        )
        self.supervision.register(self.handle_asks)
        self._tasks.append(asyncio.create_task(self.deliverer.run(), name="deliverer"))
        self._tasks.append(asyncio.create_task(self._prune(), name="prune"))
        self.records = await CallRecords.open(CallRecords.default_path(self.storage))
        self._tasks.append(asyncio.create_task(self._prune_records(), name="prune-records"))
        app = make_app(
            self.settings,
            self.switchboard,
            self.storage / "recordings",
            node=self,
            records=self.records,
            supervisions=self.supervision.registry,
            webrtc=self.webrtc,
        )
        self.runner = await start_api(app, self.settings)
        log.info("internal API on http://%s", self.settings.api.listen)
        if self.cluster is not None:
            await self.cluster.start()
        self.workers = await asyncio.to_thread(self._plan_workers)
        for w in self.workers:
            self._tasks.append(asyncio.create_task(self._keep_worker(w), name=f"w{w.index}"))
        # Many workers start at once on few cores: allow for their imports (spawned: ~1 s of
        # CPU each, and a crowd of them all finish late together; forked: ~40 ms each).
        per = 0.5 if self.forkserver is not None else 1.5
        ready_timeout = 30 + per * len(self.workers)
        await asyncio.wait_for(
            asyncio.gather(*(w.ready.wait() for w in self.workers)), ready_timeout
        )
        if self.settings.front_mode() == "managed":
            if self.rtpengine is not None:
                await self.rtpengine.start()
                self._tasks.append(asyncio.create_task(self.rtpengine.supervise(),
                                                       name="rtpengine"))
            await self._start_front()
        self.started = True
        log.info("node ready: %d worker(s), SIP on %s", len(self.workers), self.settings.sip.listen)

    def _plan_workers(self) -> list[WorkerHandle]:
        """Worker count and ports from the config and what this pjsua2 build holds per process."""
        self.plan = plan = plan_node(self.settings, probe_cache=self.storage / "pjsua2-probe.json")
        workers = [WorkerHandle(w) for w in plan.workers]
        first = plan.workers[0]
        log.info(
            "%d worker(s) x %d calls (%d pjsua2 slots, %d kept for dial legs); front: %s",
            len(workers), first.admit, first.max_calls, first.max_calls - first.admit, plan.front,
        )
        return workers

    async def _start_front(self) -> None:
        s = self.settings
        assert self.plan is not None  # planned before any worker starts
        host, port = parse_hostport(s.sip.listen)
        cfg = KamailioConfig(
            listen_host=host,
            listen_port=port,
            destinations=self.plan.destinations,
            runtime_dir=(self.storage / "kamailio").resolve(),
            children=s.kamailio.children,
            ping_interval_s=s.kamailio.ping_interval_s,
            binary=s.kamailio.binary,
            advertise=s.sip.public_address,
            webrtc=self._webrtc_front(),
            **front_limits(s, self.plan.admit),
        )
        self.front = KamailioFront(cfg)
        await self.front.start()
        # Dialogs the front kept from the previous run are calls no worker holds now.
        try:
            await self.front.end_dialogs(None, reason="gateway node restarted")
        except Exception as e:
            log.error("could not end the previous run's dialogs at the front: %s", e)
        self._tasks.append(asyncio.create_task(self.front.supervise(), name="kamailio"))
        log.info(
            "SIP front (Kamailio) on %s:%d -> %d destination(s)", host, port, len(cfg.destinations)
        )

    async def reload_webrtc_keys(self) -> None:
        """SIGHUP: `[webrtc] keys` read again from the config file and used from now on (a
        rotation needs no restart: calls and registrations stay). Nothing else is reloaded;
        an invalid file changes nothing."""
        if self.webrtc is None:
            log.warning("SIGHUP: browser calling is off; nothing to reload")
            return
        try:
            fresh = await asyncio.to_thread(load_settings, self.config_path)
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded: %s", e)
            return
        w = fresh.webrtc
        if not w.enabled or not w.keys:
            log.error("SIGHUP: the reloaded config has no [webrtc] keys; keeping the old ones")
            return
        self.webrtc.authority = TokenAuthority(
            [(k.kid, k.secret.get_secret_value()) for k in w.keys], w.token_ttl_s)
        log.info("SIGHUP: webrtc keys reloaded: %s (signing with %s)",
                 ", ".join(k.kid for k in w.keys), w.keys[0].kid)

    def _webrtc_front(self) -> WebRtcFront | None:
        s = self.settings
        if self.webrtc is None or self.rtpengine is None:
            return None
        host, port = parse_hostport(s.webrtc.ws_listen)
        api_host, api_port = parse_hostport(s.api.listen)
        if api_host in ("0.0.0.0", "::", ""):
            api_host = "127.0.0.1"
        api = f"[{api_host}]" if ":" in api_host else api_host
        return WebRtcFront(
            listen_host=host, listen_port=port, domain=s.webrtc.domain,
            check_url=f"http://{api}:{api_port}{WEBRTC_CHECK_PATH}",
            front_secret=self.webrtc.front_secret, max_expires_s=s.webrtc.token_ttl_s,
            rtpengine_sock=self.rtpengine.cfg.ng_sock,
            tls_cert=str(s.webrtc.tls_cert) if s.webrtc.tls_cert else None,
            tls_key=str(s.webrtc.tls_key) if s.webrtc.tls_key else None,
        )

    def capacity(self) -> int:
        return sum(w.admit for w in self.workers)

    async def stop(self) -> None:
        self.stopping = True
        if self.front is not None:
            await self.front.stop()  # no new calls while the workers wind down
        if self.rtpengine is not None:
            await self.rtpengine.stop()
        for w in self.workers:
            if w.channel is not None:
                w.channel.send(msgs.Stop())
        procs = [w.proc for w in self.workers if w.proc is not None]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 15)
        for p in procs:
            if p.returncode is None:
                p.kill()
        if self.forkserver is not None:
            await self.forkserver.stop()  # it holds the storage lock too
        if self.deliverer is not None:
            await self.deliverer.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.stop()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.http is not None:
            await self.http.close()
        if self.records is not None:
            await self.records.close()
        if self.outbox is not None:
            await self.outbox.aclose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # workers are gone: their inherited copies too
            self._lock_fd = None

    async def _lock_storage(self) -> None:
        path = self.storage / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_S
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(
                        "storage",
                        [("storage.dir", f"{self.storage} is in use by another running node")],
                    ) from None
                if not warned:
                    warned = True
                    log.warning("waiting for %s: another node's processes still hold it", path)
                await asyncio.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def _heartbeat(self, path: Path) -> None:
        """The last time this node was known alive: the ended_at of calls a crash leaves open."""
        while True:
            hb = Heartbeat(os.getpid(), self._run_started, time.time())
            try:
                await asyncio.to_thread(write_heartbeat, path, hb)
            except OSError as e:
                log.error("cannot write the node heartbeat %s: %s", path, e)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _prune_records(self) -> None:
        while True:
            assert self.records is not None
            try:
                await self.records.prune(time.time())
            except Exception as e:
                log.error("call records: prune failed: %s", e)
            await asyncio.sleep(3600)

    async def _prune(self) -> None:
        # Delivered rows are history; a week of it keeps late duplicate finals deduplicated.
        while True:
            assert self.outbox is not None
            pruned = await self.outbox.prune_delivered(time.time() - 7 * 86400)
            if pruned:
                log.info("outbox: pruned %d delivered event(s) older than 7 days", pruned)
            await asyncio.sleep(3600)

    # -- workers ----------------------------------------------------------------------------
    async def _keep_worker(self, w: WorkerHandle) -> None:
        backoff = 0.5
        while not self.stopping:
            started = time.monotonic()
            code = await self._run_worker(w)
            if self.stopping:
                return
            log.error(
                "worker %d exited (%s) with %d call(s) live; restarting",
                w.index,
                code,
                len(self.directory.on_worker(w.index)),
            )
            await self._worker_lost(w)
            w.restarts += 1
            self.metrics.worker_restarted()
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10)
            await asyncio.sleep(backoff)

    async def _run_worker(self, w: WorkerHandle) -> int | None:
        parent, child = socket.socketpair()
        w.ready.clear()
        try:
            w.proc, spawning = await self._launch(w, child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        w.channel = await open_channel(parent, msgs.FROM_WORKER)
        w.requester = Requester(w.channel)
        try:
            while (msg := await w.channel.recv()) is not None:
                self._on_message(w, msg)
                if spawning and w.ready.is_set():
                    spawning = False
                    self._spawning.release()
        finally:
            if spawning:
                self._spawning.release()
            w.channel.close()
            w.channel = None
            w.requester.close()  # requests waiting on it fail now (404 / next worker)
            w.requester = None
        return await w.proc.wait()

    async def _launch(
        self, w: WorkerHandle, child: socket.socket
    ) -> tuple[asyncio.subprocess.Process | ForkedProcess, bool]:
        """Start worker `w` on its end of the socketpair: forked by the fork server, or (spawn
        mode, or the fork server down) a new interpreter, holding one of the `_spawning`
        slots until it is ready (the bool: the caller releases it)."""
        if self.forkserver is not None:
            try:
                return await self.forkserver.fork(w.index, w.max_calls, child), False
            except ForkServerUnavailable as e:
                log.warning("worker %d: %s; spawning it instead", w.index, e)
        args = [
            sys.executable,
            "-m",
            "gateway.workers.worker",
            "--index",
            str(w.index),
            "--ipc-fd",
            str(child.fileno()),
            "--max-calls",
            str(w.max_calls),
        ]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        # The worker inherits the storage lock: it stays held until the last worker exits.
        keep = (child.fileno(),) if self._lock_fd is None else (child.fileno(), self._lock_fd)
        await self._spawning.acquire()
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                pass_fds=keep,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,  # pjsua2 prints its start-up lines there
            )
        except BaseException:
            self._spawning.release()
            raise
        return proc, True

    def handle_asks(self, op: type[Any], handler: AskHandler) -> None:
        """Route a worker's `Ask` carrying an `op` to `handler(worker index, op) -> result`;
        it raises OpRefused to refuse."""
        self._ask_handlers[op] = handler

    def _on_ask(self, w: WorkerHandle, msg: msgs.Ask) -> None:
        # The reply goes to the process that asked: a worker restarted meanwhile reuses ids.
        task = asyncio.create_task(self._answer(w, msg, w.channel),
                                   name=f"ask-{w.index}-{msg.id}")
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _answer(
        self, w: WorkerHandle, msg: msgs.Ask, channel: Channel[msgs.FromWorker] | None
    ) -> None:
        handler = self._ask_handlers.get(type(msg.body))
        try:
            if handler is None:
                raise OpRefused(FAILED, f"the supervisor does not handle {msg.body.op}")
            result = await handler(w.index, msg.body)
            reply = msgs.Reply(id=msg.id, ok=True, result=result)
        except OpRefused as e:
            reply = msgs.Reply(id=msg.id, ok=False, code=e.code, message=e.message)
        except Exception as e:
            log.exception("worker %d asked %s: failed", w.index, msg.body.op)
            reply = msgs.Reply(id=msg.id, ok=False, code=FAILED, message=f"{type(e).__name__}: {e}")
        if channel is not None and channel is w.channel and not channel.closed:
            channel.send(reply)

    def _on_message(self, w: WorkerHandle, msg: msgs.FromWorker) -> None:
        if isinstance(msg, msgs.Ask):
            self._on_ask(w, msg)
        elif isinstance(msg, msgs.Reply):
            if w.requester is not None:
                w.requester.reply(msg)
        elif isinstance(msg, msgs.CallEvent):
            if msg.stored and self.deliverer is not None:
                self.deliverer.notify()
            if self.records is not None:
                self.records.note_event(
                    msg.call_id, msg.event_id, msg.kind, msg.data, msg.occurred_at
                )
        elif isinstance(msg, msgs.Recording):
            if self.records is not None:
                self.records.note_recording(msg.call_id, msg.recording_id, msg.state)
        elif isinstance(msg, msgs.CallState):
            entry, before = self.directory.update(
                w.index, CallIdentity.from_wire(msg.identity), msg.status, msg.answered_at,
                msg.trunk, msg.events,
            )
            if self.switchboard is not None:
                self.switchboard.trunk_moved(before, msg.trunk)
            if self.records is not None:
                self.records.note_call(entry.summary())
        elif isinstance(msg, msgs.CallEnded):
            self.rooms.call_ended(msg.call_id)
            ended = self.directory.ended(msg.call_id)
            if self.records is not None and ended is not None:
                self.records.note_call({
                    **ended.identity.summary(msg.status, msg.answered_at, msg.ended_at),
                    "failure_code": msg.failure_code,
                    "sip_code": msg.sip_code,
                })
            if self.switchboard is not None:
                self.switchboard.trunk_done(msg.trunk, msg.status, msg.answered_at is not None)
            if self.deliverer is not None:
                self.deliverer.notify()
        elif isinstance(msg, msgs.Health):
            if self.front is not None:  # no new calls for it at the front while it lags
                self.front.report_lagging(w.uri, msg.lagging)
        elif isinstance(msg, msgs.Metric | msgs.Final):
            self.metrics.observe(msg.model_dump(exclude_none=True))
        elif isinstance(msg, msgs.Ready):
            if self.draining and w.channel is not None:
                w.channel.send(msgs.Drain(on=True))  # a worker restarted during a drain
            self.directory.worker_ready(w.index, msg.max_calls)
            if self.front is not None:  # a restarted worker does not lag (yet)
                self.front.report_lagging(w.uri, False)
            w.ready.set()
            log.info(
                "worker %d ready (pid %s, %d calls, %s)",
                w.index,
                w.proc.pid if w.proc else "?",
                w.max_calls,
                "forked" if isinstance(w.proc, ForkedProcess) else "spawned",
            )

    async def _worker_lost(self, w: WorkerHandle) -> None:
        """Each call the dead worker held gets its final event, unless it already has one."""
        assert self.outbox is not None
        now = time.time()
        if self.dial is not None:  # first: it reads the directory's entries for the lost legs
            self.dial.worker_lost(w.index)
        if self.supervision is not None:
            self.supervision.worker_lost(w.index)
        entries = self.directory.worker_gone(w.index)
        # all queued at once: one transaction on the writer thread for the worker's calls
        finals = [
            self.outbox.run(functools.partial(write_lost_call, entry=e, index=w.index, now=now),
                            "worker_lost final")
            for e in entries
        ]
        for entry, fut in zip(entries, finals, strict=True):
            try:
                answered_at, stored = await fut
            except Exception:
                log.exception("call %s: its worker_lost final could not be stored",
                              entry.identity.call_id)
                answered_at, stored = entry.answered_at, None
            if stored:
                log.warning("call %s: call.failed (worker_lost)", entry.identity.call_id)
                self.metrics.call_final("failed")
            if self.records is not None and stored is not False:
                self.records.note_call({
                    **entry.identity.summary("failed", answered_at, now),
                    "failure_code": "worker_lost",
                })
            if self.switchboard is not None:
                self.switchboard.trunk_done(entry.trunk, "failed", entry.answered_at is not None)
        if self.deliverer is not None:
            self.deliverer.notify()
        try:  # its rooms go on without its participants (re-homed if it was a hub)
            await self.rooms.worker_lost(w.index)
        except Exception:
            log.exception("rooms: cleaning up after worker %d failed", w.index)
        if self.front is not None:
            # the carrier's side of those calls is still up: the front sends it BYE
            self._tasks.append(asyncio.create_task(self._end_dialogs(w), name="end-dialogs"))

    async def _end_dialogs(self, w: WorkerHandle) -> None:
        try:
            await self.front.end_dialogs(w.uri, reason=f"worker {w.index} lost")
        except Exception as e:  # the front may be restarting too
            log.error("could not end worker %d's dialogs at the front: %s", w.index, e)


async def run_node(
    settings: Settings,
    config_path: Path | None,
    started: asyncio.Event | None = None,
    forkserver: ForkServer | None = None,
) -> None:
    node = Node(settings, config_path, forkserver)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def hup() -> None:
        task = asyncio.ensure_future(node.reload_webrtc_keys())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hup)
    try:
        await node.start()
    except BaseException:
        await node.stop()  # leave no worker or Kamailio behind
        raise
    if started is not None:
        started.set()
    print(
        f"sautikit-gateway ready: SIP {settings.sip.listen} (udp+tcp), "
        f"API http://{settings.api.listen} (pid {os.getpid()})",
        flush=True,
    )
    await stop.wait()
    log.info("stopping")
    await node.stop()
