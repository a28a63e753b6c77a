"""Prometheus metrics without a client library: counters, gauges, histograms, and a text renderer.

`Registry.render()` writes the Prometheus text exposition format 0.0.4: per family one `# HELP`
and one `# TYPE` line, then its samples; label values escaped (backslash, double quote, newline);
histograms as cumulative `_bucket{le="..."}` series ending in `le="+Inf"`, then `_sum` and
`_count`. Values that live elsewhere (calls per worker, outbox depth) are gauge callbacks,
evaluated at render time.

`NodeMetrics` is the gateway's own metric set. The supervisor owns it and forwards the IPC
messages workers send (`observe`); the `*_msg` helpers build those messages on the worker side.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "CALLBACK_FETCH_BUCKETS",
    "CALL_SETUP_BUCKETS",
    "CONTENT_TYPE",
    "DIRECTIONS",
    "FINAL_STATUSES",
    "OUTBOX_STATES",
    "Counter",
    "Gauge",
    "GaugeFn",
    "Histogram",
    "NodeMetrics",
    "Registry",
    "callback_fetch_msg",
    "final_msg",
    "setup_seconds_msg",
]

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Labels = Mapping[str, str]
GaugeFn = Callable[[], Iterable[tuple[Labels, float]]]
LabelValue = str | int


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    return name


def _check_labelnames(labelnames: Iterable[str], reserved: Sequence[str] = ()) -> tuple[str, ...]:
    names = tuple(labelnames)
    for n in names:
        if not _LABEL_RE.match(n) or n.startswith("__"):
            raise ValueError(f"invalid label name {n!r}")
        if n in reserved:
            raise ValueError(f"label name {n!r} is reserved here")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names in {names!r}")
    return names


def format_value(value: float) -> str:
    """A sample value or `le` bound as Prometheus parses it (Go ParseFloat): +Inf, -Inf, NaN.

    Counts (ints: histogram buckets, _count) print as integers, other values as Python's
    shortest round-tripping float repr ("0.005", "1.0", "1e+21").
    """
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
    return f"{{{inner}}}" if inner else ""


class _Metric:
    kind: str = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        self.name = _check_name(name)
        self.help = help
        self.labelnames = _check_labelnames(labelnames, self._reserved())
        self._lock = threading.Lock()

    @staticmethod
    def _reserved() -> Sequence[str]:
        return ()

    def _key(self, labels: Mapping[str, LabelValue]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name}: labels {sorted(labels)} given, {list(self.labelnames)} expected"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def _samples(self) -> Iterable[tuple[str, list[tuple[str, str]], float]]:
        """(name suffix, label pairs, value) for every sample of this family."""
        raise NotImplementedError

    def render_into(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} {self.kind}\n")
        for suffix, pairs, value in self._samples():
            out.append(f"{self.name}{suffix}{_labels_text(pairs)} {format_value(value)}\n")


class _Value:
    __slots__ = ("_lock", "_value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value = 0.0

    @property
    def value(self) -> float:
        with self._lock:
            return self._value


class _CounterChild(_Value):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if not amount >= 0 or math.isinf(amount):  # also refuses NaN
            raise ValueError(f"counters only go up by a finite amount, not {amount!r}")
        with self._lock:
            self._value += amount


class _GaugeChild(_Value):
    __slots__ = ()

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount


class _ScalarMetric(_Metric):
    """Counter and Gauge: one float per label set; an unlabelled metric renders 0 from the start."""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> Any:
        raise NotImplementedError

    def _child(self, labels: Mapping[str, LabelValue]) -> Any:
        key = self._key(labels)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
        return child

    def _only(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels(...)")
        return self._children[()]

    @property
    def value(self) -> float:
        """The unlabelled metric's value."""
        return float(self._only().value)

    def _samples(self) -> Iterable[tuple[str, list[tuple[str, str]], float]]:
        with self._lock:
            items = list(self._children.items())
        for key, child in items:
            yield "", list(zip(self.labelnames, key, strict=True)), child.value


class Counter(_ScalarMetric):
    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild(threading.Lock())

    def labels(self, **labels: LabelValue) -> _CounterChild:
        """The series for these labels (created at 0, so it renders before its first inc)."""
        child: _CounterChild = self._child(labels)
        return child

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)


class Gauge(_ScalarMetric):
    kind = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild(threading.Lock())

    def labels(self, **labels: LabelValue) -> _GaugeChild:
        child: _GaugeChild = self._child(labels)
        return child

    def set(self, value: float) -> None:
        self._only().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only().dec(amount)


class _GaugeFnMetric(_Metric):
    """A gauge whose samples come from a callback at render time.

    Label names come from the returned dicts (any label set, per sample). A later sample with
    the same label set replaces an earlier one (a scrape must not hold duplicate series). If
    the callback raises or returns bad labels, the family renders without samples and the
    error is logged: one broken source never fails the whole scrape.
    """

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: GaugeFn) -> None:
        super().__init__(name, help)
        self.fn = fn

    def _samples(self) -> Iterable[tuple[str, list[tuple[str, str]], float]]:
        try:
            seen: dict[tuple[tuple[str, str], ...], float] = {}
            for labels, value in self.fn():
                pairs = tuple((str(k), str(v)) for k, v in labels.items())
                _check_labelnames(k for k, _ in pairs)
                seen[pairs] = float(value)
        except Exception:
            log.exception("metrics: gauge callback for %s failed; no samples this time", self.name)
            return []
        return [("", list(pairs), value) for pairs, value in seen.items()]


class _HistogramChild:
    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        if math.isnan(value):
            raise ValueError("cannot observe NaN")
        i = bisect.bisect_left(self._bounds, value)  # first bound >= value: `le` is inclusive
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float, int]:
        """(cumulative bucket counts, +Inf last; sum; count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative: list[int] = []
        running = 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total, running


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Iterable[float], labelnames: Iterable[str] = ()
    ) -> None:
        super().__init__(name, help, labelnames)
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds.pop()  # +Inf is always there; accept it being spelled out
        if any(math.isnan(b) or math.isinf(b) for b in bounds):
            raise ValueError(f"{name}: bucket bounds must be finite (+Inf is implicit)")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"{name}: bucket bounds must be strictly increasing")
        self.buckets = tuple(bounds)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        if not self.labelnames:
            self._children[()] = _HistogramChild(self.buckets)

    @staticmethod
    def _reserved() -> Sequence[str]:
        return ("le",)

    def labels(self, **labels: LabelValue) -> _HistogramChild:
        key = self._key(labels)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = _HistogramChild(self.buckets)
        return child

    def observe(self, value: float) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels(...)")
        self._children[()].observe(value)

    def _samples(self) -> Iterable[tuple[str, list[tuple[str, str]], float]]:
        with self._lock:
            items = list(self._children.items())
        les = [*(format_value(b) for b in self.buckets), "+Inf"]
        for key, child in items:
            pairs = list(zip(self.labelnames, key, strict=True))
            cumulative, total, count = child.snapshot()
            for le, n in zip(les, cumulative, strict=True):
                yield "_bucket", [*pairs, ("le", le)], n
            yield "_sum", pairs, total
            yield "_count", pairs, count


class Registry:
    """Metric families in registration order; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._taken: set[str] = set()  # sample names, histogram suffixes included
        self._lock = threading.Lock()

    def _add(self, metric: _Metric) -> None:
        names = {metric.name}
        if isinstance(metric, Histogram):
            names |= {f"{metric.name}_bucket", f"{metric.name}_sum", f"{metric.name}_count"}
        with self._lock:
            if names & self._taken:
                raise ValueError(f"metric {metric.name!r} clashes with one already registered")
            self._taken |= names
            self._metrics[metric.name] = metric

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        m = Counter(name, help, labelnames)
        self._add(m)
        return m

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        m = Gauge(name, help, labelnames)
        self._add(m)
        return m

    def histogram(
        self, name: str, help: str, buckets: Iterable[float], labelnames: Iterable[str] = ()
    ) -> Histogram:
        m = Histogram(name, help, buckets, labelnames)
        self._add(m)
        return m

    def gauge_fn(self, name: str, help: str, fn: GaugeFn) -> None:
        self._add(_GaugeFnMetric(name, help, fn))

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        out: list[str] = []
        for m in metrics:
            m.render_into(out)
        return "".join(out)


# -- the gateway's own metrics ----------------------------------------------------------------

FINAL_STATUSES: Final = ("completed", "failed", "busy", "no_answer", "canceled", "rejected")
OUTBOX_STATES: Final = ("pending", "delivered", "dead_letter")
DIRECTIONS: Final = ("inbound", "outbound")
FETCH_OUTCOMES: Final = ("ok", "error")
CALL_SETUP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# Past 2 s up to the largest callback timeout (callbacks.timeout_s <= 120), so timeouts land
# in a finite bucket rather than only in +Inf.
CALLBACK_FETCH_BUCKETS: Final = (*CALL_SETUP_BUCKETS, 5.0, 10.0, 30.0, 120.0)

# Names in `{"t": "metric", "name": ...}` messages from workers.
SETUP_SECONDS: Final = "setup_seconds"
CALLBACK_FETCH_SECONDS: Final = "callback_fetch_seconds"
ACTION_SKIPPED: Final = "action_skipped"
SKIP_REASONS: Final = ("tts_failed", "media_fetch_failed", "media_decode_failed", "url_forbidden")
SKIP_VERBS: Final = ("say", "play")  # label values are bounded: anything else counts as "other"


def setup_seconds_msg(seconds: float) -> dict[str, Any]:
    """Worker → supervisor: INVITE received → 200 OK sent (callback fetch included)."""
    return {"t": "metric", "name": SETUP_SECONDS, "value": seconds}


def callback_fetch_msg(seconds: float, ok: bool) -> dict[str, Any]:
    """Worker → supervisor: one voice app request (DNS check to the whole document read)."""
    return {
        "t": "metric",
        "name": CALLBACK_FETCH_SECONDS,
        "value": seconds,
        "outcome": "ok" if ok else "error",
    }


def action_skipped_msg(verb: str, reason: str) -> dict[str, Any]:
    """Worker → supervisor: a say/play skipped because its media failed (the call went on)."""
    return {"t": "metric", "name": ACTION_SKIPPED, "verb": verb, "reason": reason}


def final_msg(status: str) -> dict[str, Any]:
    """Worker → supervisor: a call's final status (once per call, with its final event)."""
    return {"t": "final", "status": status}


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
    """

    def __init__(
        self,
        *,
        calls: Callable[[], Iterable[Mapping[str, Any]]],
        workers: Callable[[], Iterable[tuple[int, bool]]],
        outbox_counts: Callable[[], Mapping[str, int] | None],
        registry: Registry | None = None,
    ) -> None:
        self.registry = r = registry if registry is not None else Registry()
        self._calls = calls
        self._workers = workers
        self._outbox_counts = outbox_counts
        self._outbox_snapshot: Mapping[str, int] | None = None
        self._in_render = False

        r.gauge_fn(
            "sautikit_active_calls",
            "Calls in progress, by direction and worker process.",
            self._active_calls,
        )
        self.calls_total = r.counter(
            "sautikit_calls_total", "Calls ended, by final status.", ["status"]
        )
        for status in FINAL_STATUSES:
            self.calls_total.labels(status=status)  # every status renders, 0 until it happens
        self.call_setup_seconds = r.histogram(
            "sautikit_call_setup_seconds",
            "Time from INVITE received to 200 OK sent, voice app fetch included.",
            CALL_SETUP_BUCKETS,
        )
        self.callback_fetch_seconds = r.histogram(
            "sautikit_callback_fetch_seconds",
            "Voice app request latency, by outcome (ok or error).",
            CALLBACK_FETCH_BUCKETS,
            ["outcome"],
        )
        for outcome in FETCH_OUTCOMES:
            self.callback_fetch_seconds.labels(outcome=outcome)
        self.actions_skipped = r.counter(
            "sautikit_actions_skipped_total",
            "say/play actions skipped because their media failed, by verb and reason "
            "(tts_failed, media_fetch_failed, media_decode_failed, url_forbidden).",
            ["verb", "reason"],
        )
        r.gauge_fn(
            "sautikit_events_outbox",
            "Event outbox rows by state (pending, delivered, dead_letter).",
            self._outbox_states,
        )
        r.gauge_fn(
            "sautikit_events_dead_letters",
            "Events that exhausted their delivery attempts (outbox dead_letter rows).",
            self._dead_letters,
        )
        r.gauge_fn(
            "sautikit_workers", "Worker processes by state (ready, down).", self._worker_states
        )
        self.worker_restarts = r.counter(
            "sautikit_worker_restarts_total", "Worker processes restarted after exiting."
        )
        self.draining = r.gauge(
            "sautikit_draining", "1 while the node is draining (refusing new calls), else 0."
        )

    # -- what the supervisor calls ----------------------------------------------------------
    def observe(self, msg: Mapping[str, Any]) -> bool:
        """Take one worker IPC message; True if it was a metrics message (even a bad one).

        Other message kinds are ignored, so the supervisor may forward every message. A
        malformed metrics message is logged and dropped; this never raises.
        """
        kind = msg.get("t")
        if kind == "final":
            status = msg.get("status")
            if isinstance(status, str) and status in FINAL_STATUSES:
                self.calls_total.labels(status=status).inc()
            else:
                log.warning("metrics: final status %r is not one of %s", status, FINAL_STATUSES)
            return True
        if kind != "metric":
            return False
        if msg.get("name") == ACTION_SKIPPED:
            verb, reason = msg.get("verb"), msg.get("reason")
            if isinstance(reason, str) and reason in SKIP_REASONS:
                label = verb if isinstance(verb, str) and verb in SKIP_VERBS else "other"
                self.actions_skipped.labels(verb=label, reason=reason).inc()
            else:
                log.warning("metrics: skip reason %r is not one of %s", reason, SKIP_REASONS)
            return True
        name, value = msg.get("name"), _seconds(msg.get("value"))
        if value is None:
            log.warning("metrics: %r: value %r is not seconds", name, msg.get("value"))
        elif name == SETUP_SECONDS:
            self.call_setup_seconds.observe(value)
        elif name == CALLBACK_FETCH_SECONDS:
            outcome = msg.get("outcome")
            if isinstance(outcome, str) and outcome in FETCH_OUTCOMES:
                self.callback_fetch_seconds.labels(outcome=outcome).observe(value)
            else:
                log.warning("metrics: callback fetch outcome %r is not ok|error", outcome)
        else:
            log.warning("metrics: unknown metric %r from a worker", name)
        return True

    def call_final(self, status: str) -> None:
        """A final status counted in the supervisor (a call lost with its worker: "failed")."""
        self.observe(final_msg(status))

    def worker_restarted(self) -> None:
        self.worker_restarts.inc()

    def set_draining(self, draining: bool) -> None:
        self.draining.set(1.0 if draining else 0.0)

    def render(self) -> str:
        # Both outbox families come from one Outbox.counts() query per scrape.
        self._in_render = True
        try:
            return self.registry.render()
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
