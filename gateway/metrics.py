"""The node's Prometheus metrics, on `prometheus_client`.

Each node has its own `CollectorRegistry` (never the library's global one: tests run several
nodes in one process). Families whose values live elsewhere (calls per worker, outbox counts,
workers up) are `GaugeFn` collectors, computed at scrape time. `NodeMetrics.render()` is the
/metrics body, the text format 0.0.4 (`CONTENT_TYPE`), without prometheus_client's `_created`
series (nothing here needs a counter's creation time; they would double the series).

The supervisor is the one process that serves /metrics: workers send it their observations as
IPC messages (`gateway.workers.protocol.Metric` named by the constants below, and `Final`), and
`NodeMetrics.observe` applies them. Label children of fixed label sets are looked up once and
kept, so an update is one locked add.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.workers.protocol import (
    ACTION_SKIPPED,
    CALLBACK_FETCH_SECONDS,
    SETUP_SECONDS,
    STREAM_ENDED,
    STREAM_OPENED,
)

__all__ = [
    "ACTION_SKIPPED",
    "CALLBACK_FETCH_BUCKETS",
    "CALLBACK_FETCH_SECONDS",
    "CALL_SETUP_BUCKETS",
    "CONTENT_TYPE",
    "FINAL_STATUSES",
    "SETUP_SECONDS",
    "GaugeFn",
    "NodeMetrics",
    "render",
]

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes

Labels = Mapping[str, str]
GaugeSamples = Callable[[], Iterable[tuple[Labels, float]]]


class GaugeFn(Collector):
    """A gauge family whose samples `fn` returns at scrape time: (labels, value) each.

    A later sample with the same labels replaces an earlier one (a scrape must not hold
    duplicate series). If `fn` raises, the family has no samples this time and the error is
    logged: one broken source never fails the whole scrape.
    """

    def __init__(self, name: str, help: str, fn: GaugeSamples) -> None:
        self.name, self.help, self.fn = name, help, fn

    def describe(self) -> list[Metric]:  # lets the registry refuse a clashing name
        return [GaugeMetricFamily(self.name, self.help)]

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily(self.name, self.help)
        try:
            samples = {
                tuple((str(k), str(v)) for k, v in labels.items()): float(value)
                for labels, value in self.fn()
            }
        except Exception:
            log.exception("metrics: gauge callback for %s failed; no samples this time", self.name)
            return [family]
        for labels, value in samples.items():
            family.add_sample(self.name, dict(labels), value)
        return [family]


class _WithoutCreated(Collector):
    """The registry's families minus their `_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


def render(registry: CollectorRegistry) -> str:
    """The text exposition of `registry` (format 0.0.4, no `_created` series)."""
    return generate_latest(_WithoutCreated(registry)).decode("utf-8")


# -- the gateway's own metrics ----------------------------------------------------------------

FINAL_STATUSES: Final = ("completed", "failed", "busy", "no_answer", "canceled", "rejected")
OUTBOX_STATES: Final = ("pending", "delivered", "dead_letter")
DIRECTIONS: Final = ("inbound", "outbound")
FETCH_OUTCOMES: Final = ("ok", "error")
CALL_SETUP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# Past 2 s up to the largest callback timeout (callbacks.timeout_s <= 120), so timeouts land
# in a finite bucket rather than only in +Inf.
CALLBACK_FETCH_BUCKETS: Final = (*CALL_SETUP_BUCKETS, 5.0, 10.0, 30.0, 120.0)

SKIP_REASONS: Final = ("tts_failed", "media_fetch_failed", "media_decode_failed", "url_forbidden")
STREAM_KINDS: Final = ("stream", "ai_agent")
STREAM_END_REASONS: Final = ("closed", "disconnect", "handover", "stopped", "refused",
                             "unreachable", "dropped")
SKIP_VERBS: Final = ("say", "play")  # label values are bounded: anything else counts as "other"


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) and v >= 0 else None


class NodeMetrics:
    """The gateway's metric set; the supervisor creates one and serves `render()` at /metrics.

    calls: the live calls (dicts with "direction" and "worker"), e.g. `Node.active_calls`.
    workers: (worker index, ready) per worker slot, e.g. ready = started and its IPC channel up.
    outbox_counts: rows per outbox state (`Outbox.counts`), or None while there is no outbox.
    Other parts of the node register their own families on `registry`.
    """

    def __init__(
        self,
        *,
        calls: Callable[[], Iterable[Mapping[str, Any]]],
        workers: Callable[[], Iterable[tuple[int, bool]]],
        outbox_counts: Callable[[], Mapping[str, int] | None],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self._calls = calls
        self._workers = workers
        self._outbox_counts = outbox_counts
        self._outbox_snapshot: Mapping[str, int] | None = None
        self._in_render = False

        r.register(GaugeFn(
            "sautikit_active_calls",
            "Calls in progress, by direction and worker process.",
            self._active_calls,
        ))
        calls_total = Counter(
            "sautikit_calls_total", "Calls ended, by final status.", ["status"], registry=r
        )
        # every status renders, 0 until it happens
        self._calls_by_status = {s: calls_total.labels(status=s) for s in FINAL_STATUSES}
        self.call_setup_seconds = Histogram(
            "sautikit_call_setup_seconds",
            "Time from INVITE received to 200 OK sent, voice app fetch included.",
            buckets=CALL_SETUP_BUCKETS,
            registry=r,
        )
        fetch = Histogram(
            "sautikit_callback_fetch_seconds",
            "Voice app request latency, by outcome (ok or error).",
            ["outcome"],
            buckets=CALLBACK_FETCH_BUCKETS,
            registry=r,
        )
        self._fetch_by_outcome = {o: fetch.labels(outcome=o) for o in FETCH_OUTCOMES}
        self._actions_skipped = Counter(
            "sautikit_actions_skipped_total",
            "say/play actions skipped because their media failed, by verb and reason "
            "(tts_failed, media_fetch_failed, media_decode_failed, url_forbidden).",
            ["verb", "reason"],
            registry=r,
        )
        self._skipped: dict[tuple[str, str], Counter] = {}  # children, made on first use
        opened = Counter(
            "sautikit_streams_opened_total",
            "Stream forks started, by kind (stream, ai_agent).", ["kind"], registry=r,
        )
        self._streams_opened = {k: opened.labels(kind=k) for k in STREAM_KINDS}
        ended = Counter(
            "sautikit_streams_ended_total",
            "Stream forks ended, by reason (closed, disconnect, handover, stopped, refused, "
            "unreachable, dropped).", ["reason"], registry=r,
        )
        self._streams_ended = {k: ended.labels(reason=k) for k in STREAM_END_REASONS}
        r.register(GaugeFn(
            "sautikit_events_outbox",
            "Event outbox rows by state (pending, delivered, dead_letter).",
            self._outbox_states,
        ))
        r.register(GaugeFn(
            "sautikit_events_dead_letters",
            "Events that exhausted their delivery attempts (outbox dead_letter rows).",
            self._dead_letters,
        ))
        r.register(GaugeFn(
            "sautikit_workers", "Worker processes by state (ready, down).", self._worker_states
        ))
        self.worker_restarts = Counter(
            "sautikit_worker_restarts_total",
            "Worker processes restarted after exiting.",
            registry=r,
        )
        self._webrtc = Counter(
            "sautikit_webrtc_checks_total",
            "Browser REGISTER and INVITE token checks, by method and result (ok, or why "
            "refused: token_expired, token_bad_signature, token_unknown_key, ...).",
            ["method", "result"], registry=r,
        )
        self.webrtc_registrations = Gauge(
            "sautikit_webrtc_registrations",
            "Browser registrations (contacts) held by the front.", registry=r,
        )
        browser_calls = Counter(
            "sautikit_webrtc_calls_total",
            "Browser calls started, by direction (from_browser: a browser's INVITE passed its "
            "token check; to_browser: a dial leg to client:<name> placed).",
            ["direction"], registry=r,
        )
        self._webrtc_calls = {d: browser_calls.labels(direction=d) for d in ("from_browser",
                                                                     "to_browser")}
        self.draining = Gauge(
            "sautikit_draining",
            "1 while the node is draining (refusing new calls), else 0.",
            registry=r,
        )

    # -- what the supervisor calls ----------------------------------------------------------
    def observe(self, msg: Mapping[str, Any]) -> bool:
        """Take one worker IPC message; True if it was a metrics message (even a bad one).

        Other message kinds are ignored, so the supervisor may forward every message. A
        malformed metrics message is logged and dropped; this never raises.
        """
        kind = msg.get("t")
        if kind == "final":
            self.call_final(msg.get("status"))
            return True
        if kind != "metric":
            return False
        if msg.get("name") == ACTION_SKIPPED:
            self._skip(msg.get("verb"), msg.get("reason"))
            return True
        if msg.get("name") == STREAM_OPENED:
            opened = self._streams_opened.get(str(msg.get("verb")))
            if opened is not None:
                opened.inc()
            return True
        if msg.get("name") == STREAM_ENDED:
            ended = self._streams_ended.get(str(msg.get("reason")))
            if ended is not None:
                ended.inc()
            return True
        name, value = msg.get("name"), _seconds(msg.get("value"))
        if value is None:
            log.warning("metrics: %r: value %r is not seconds", name, msg.get("value"))
        elif name == SETUP_SECONDS:
            self.call_setup_seconds.observe(value)
        elif name == CALLBACK_FETCH_SECONDS:
            outcome = msg.get("outcome")
            child = self._fetch_by_outcome.get(outcome) if isinstance(outcome, str) else None
            if child is not None:
                child.observe(value)
            else:
                log.warning("metrics: callback fetch outcome %r is not ok|error", outcome)
        else:
            log.warning("metrics: unknown metric %r from a worker", name)
        return True

    def webrtc_check(self, method: str, result: str) -> None:
        if method in ("REGISTER", "INVITE"):  # bounded label values only
            self._webrtc.labels(method=method, result=result).inc()
        if method == "INVITE" and result == "ok":
            self.webrtc_call("from_browser")

    def webrtc_call(self, direction: str) -> None:
        child = self._webrtc_calls.get(direction)
        if child is not None:
            child.inc()

    def call_final(self, status: object) -> None:
        """A call's final status (from a worker's `Final`, or counted in the supervisor: a call
        lost with its worker is "failed")."""
        child = self._calls_by_status.get(status) if isinstance(status, str) else None
        if child is not None:
            child.inc()
        else:
            log.warning("metrics: final status %r is not one of %s", status, FINAL_STATUSES)

    def _skip(self, verb: object, reason: object) -> None:
        if not (isinstance(reason, str) and reason in SKIP_REASONS):
            log.warning("metrics: skip reason %r is not one of %s", reason, SKIP_REASONS)
            return
        label = verb if isinstance(verb, str) and verb in SKIP_VERBS else "other"
        child = self._skipped.get((label, reason))
        if child is None:
            child = self._skipped[(label, reason)] = self._actions_skipped.labels(label, reason)
        child.inc()

    def worker_restarted(self) -> None:
        self.worker_restarts.inc()

    def set_draining(self, draining: bool) -> None:
        self.draining.set(1.0 if draining else 0.0)

    def render(self) -> str:
        # Both outbox families come from one Outbox.counts() query per scrape.
        self._in_render = True
        try:
            return render(self.registry)
        finally:
            self._in_render = False
            self._outbox_snapshot = None

    # -- gauge callbacks --------------------------------------------------------------------
    def _active_calls(self) -> Iterable[tuple[Labels, float]]:
        counts: dict[tuple[str, str], int] = {}
        for index, _ready in self._workers():
            for direction in DIRECTIONS:
                counts[(direction, str(index))] = 0
        for call in self._calls():
            key = (str(call.get("direction") or "unknown"), str(call.get("worker", "")))
            counts[key] = counts.get(key, 0) + 1
        return [({"direction": d, "worker": w}, n) for (d, w), n in counts.items()]

    def _outbox(self) -> Mapping[str, int] | None:
        if self._in_render and self._outbox_snapshot is not None:
            return self._outbox_snapshot
        counts = self._outbox_counts()
        if self._in_render:
            self._outbox_snapshot = counts
        return counts

    def _outbox_states(self) -> Iterable[tuple[Labels, float]]:
        counts = self._outbox()
        if counts is None:
            return []
        return [({"state": s}, counts.get(s, 0)) for s in OUTBOX_STATES]

    def _dead_letters(self) -> Iterable[tuple[Labels, float]]:
        counts = self._outbox()
        return [] if counts is None else [({}, counts.get("dead_letter", 0))]

    def _worker_states(self) -> Iterable[tuple[Labels, float]]:
        ready = down = 0
        for _index, ok in self._workers():
            if ok:
                ready += 1
            else:
                down += 1
        return [({"state": "ready"}, ready), ({"state": "down"}, down)]
