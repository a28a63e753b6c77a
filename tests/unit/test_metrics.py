"""gateway.metrics on prometheus_client: the node's families, read back with prometheus_client's
own text parser (what a Prometheus server would accept) plus the checks it leaves out."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    ACTION_SKIPPED,
    CALL_SETUP_BUCKETS,
    CONTENT_TYPE,
    GaugeFn,
    NodeMetrics,
    render,
)
from gateway.workers.protocol import Final, Metric

# -- reading /metrics back ----------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str  # as exposed: a counter's with its _total
    help: str
    type: str
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def get(self, suffix: str = "", **labels: str) -> float:
        for (name, lbls), value in self.samples.items():
            if name == self.name + suffix and dict(lbls) == labels:
                return value
        raise KeyError((suffix, labels))

    def series(self, suffix: str = "") -> list[dict[str, str]]:
        return [dict(lbls) for (name, lbls) in self.samples if name == self.name + suffix]


def parse(text: str) -> dict[str, Family]:
    """prometheus_client's parser, plus: a final newline, HELP and TYPE on every family, no
    family twice, no duplicate series, and no `_created` series (we do not expose them)."""
    assert text == "" or text.endswith("\n")
    families: dict[str, Family] = {}
    for f in text_string_to_metric_families(text):
        name = f.name + "_total" if f.type == "counter" else f.name
        assert name not in families, f"family {name} twice"
        assert f.type in ("counter", "gauge", "histogram"), f"{name}: no TYPE"
        assert f"# HELP {name} " in text, f"{name}: no HELP"
        fam = families[name] = Family(name, f.documentation, f.type)
        for s in f.samples:
            assert not s.name.endswith("_created"), s
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in fam.samples, f"duplicate series {key}"
            fam.samples[key] = s.value
    return families


def check_histogram(fam: Family) -> None:
    """Per label set: le ascending and ending in +Inf, counts cumulative, +Inf == _count."""
    assert fam.type == "histogram"
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for (name, labels), value in fam.samples.items():
        if name == fam.name + "_bucket":
            d = dict(labels)
            le = float(d.pop("le"))
            groups.setdefault(tuple(sorted(d.items())), []).append((le, value))
    assert groups
    for rest, buckets in groups.items():
        les = [le for le, _ in buckets]
        assert les == sorted(les) and les[-1] == math.inf
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), f"not cumulative: {counts}"
        assert fam.samples[(fam.name + "_count", rest)] == counts[-1]
        assert (fam.name + "_sum", rest) in fam.samples


def msg(m: Metric | Final) -> dict[str, Any]:
    """What the supervisor hands NodeMetrics.observe for a worker's message (gateway/node.py)."""
    return m.model_dump(exclude_none=True)


# -- render and GaugeFn -------------------------------------------------------------------------


def test_render_is_valid_text_without_created_series() -> None:
    r = CollectorRegistry()
    c = Counter("app_requests_total", "Requests served.", ["method", "code"], registry=r)
    c.labels(method="GET", code="200").inc(3)
    h = Histogram("lat_seconds", "Latency.", ["outcome"], buckets=CALL_SETUP_BUCKETS, registry=r)
    for i in range(50):
        h.labels(outcome="ok").observe(i * 0.01)
    Gauge("temperature", "Temperature.", registry=r).set(-3.25)
    text = render(r)
    assert "_created" not in text
    fams = parse(text)
    assert list(fams) == ["app_requests_total", "lat_seconds", "temperature"]
    assert fams["app_requests_total"].get(method="GET", code="200") == 3
    check_histogram(fams["lat_seconds"])
    assert fams["lat_seconds"].get("_bucket", outcome="ok", le="0.25") == 26  # le is inclusive
    assert fams["temperature"].get() == -3.25


def test_escaping_round_trips() -> None:
    nasty = 'a\\b"c\nd}e,f=g'
    r = CollectorRegistry()
    Counter("esc_total", 'Help with a \\ backslash\nand a "quote".', ["v"], registry=r).labels(
        v=nasty
    ).inc()
    text = render(r)
    assert len(text.splitlines()) == 3  # the newlines stayed escaped
    fam = parse(text)["esc_total"]
    assert fam.help == 'Help with a \\ backslash\nand a "quote".'
    assert fam.get(v=nasty) == 1.0


def test_gauge_fn_evaluated_at_render() -> None:
    r = CollectorRegistry()
    depth = {"n": 1}
    r.register(GaugeFn("q_depth", "Queue depth.", lambda: [({"q": "a"}, depth["n"]), ({}, 7)]))
    assert parse(render(r))["q_depth"].get(q="a") == 1
    depth["n"] = 5
    fam = parse(render(r))["q_depth"]
    assert fam.get(q="a") == 5 and fam.get() == 7


def test_gauge_fn_failure_does_not_break_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> list[tuple[dict[str, str], float]]:
        raise RuntimeError("source gone")

    r = CollectorRegistry()
    r.register(GaugeFn("broken", "Broken.", boom))
    Gauge("fine", "Fine.", registry=r).set(2)
    with caplog.at_level(logging.ERROR, "gateway.metrics"):
        fams = parse(render(r))
    assert fams["broken"].samples == {}
    assert fams["fine"].get() == 2
    assert "broken" in caplog.text


def test_gauge_fn_duplicate_label_set_last_wins() -> None:
    r = CollectorRegistry()
    r.register(GaugeFn("d", "D.", lambda: [({"a": "1"}, 1), ({"a": "1"}, 2)]))
    assert parse(render(r))["d"].samples == {("d", (("a", "1"),)): 2.0}


def test_name_clashes_refused() -> None:
    r = CollectorRegistry()
    r.register(GaugeFn("lat", "x", lambda: []))
    with pytest.raises(ValueError):
        Histogram("lat", "x", registry=r)
    with pytest.raises(ValueError):
        r.register(GaugeFn("lat", "x", lambda: []))


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert CONTENT_TYPE == prometheus_client.CONTENT_TYPE_PLAIN_0_0_4  # what render() writes


# -- NodeMetrics ------------------------------------------------------------------------------


class FakeNode:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.workers: list[tuple[int, bool]] = [(0, True), (1, True)]
        self.outbox: dict[str, int] | None = {"pending": 3, "delivered": 40, "dead_letter": 2}
        self.outbox_queries = 0

    def outbox_counts(self) -> dict[str, int] | None:
        self.outbox_queries += 1
        return self.outbox

    def metrics(self) -> NodeMetrics:
        return NodeMetrics(
            calls=lambda: self.calls,
            workers=lambda: self.workers,
            outbox_counts=self.outbox_counts,
        )


EXPECTED_FAMILIES = {
    "sautikit_active_calls": "gauge",
    "sautikit_calls_total": "counter",
    "sautikit_call_setup_seconds": "histogram",
    "sautikit_callback_fetch_seconds": "histogram",
    "sautikit_actions_skipped_total": "counter",
    "sautikit_events_outbox": "gauge",
    "sautikit_events_dead_letters": "gauge",
    "sautikit_workers": "gauge",
    "sautikit_worker_restarts_total": "counter",
    "sautikit_draining": "gauge",
    "sautikit_streams_opened_total": "counter",
    "sautikit_streams_ended_total": "counter",
    "sautikit_webrtc_checks_total": "counter",
    "sautikit_webrtc_registrations": "gauge",
    "sautikit_webrtc_calls_total": "counter",
}


def test_node_metrics_families_and_initial_values() -> None:
    node = FakeNode()
    fams = parse(node.metrics().render())
    assert {n: f.type for n, f in fams.items()} == EXPECTED_FAMILIES
    assert all(f.help for f in fams.values())
    calls = fams["sautikit_calls_total"]
    assert calls.series() == [
        {"status": s} for s in ("completed", "failed", "busy", "no_answer", "canceled", "rejected")
    ]
    assert set(calls.samples.values()) == {0.0}
    active = fams["sautikit_active_calls"]
    assert sorted(active.series(), key=lambda d: (d["worker"], d["direction"])) == [
        {"direction": "inbound", "worker": "0"},
        {"direction": "outbound", "worker": "0"},
        {"direction": "inbound", "worker": "1"},
        {"direction": "outbound", "worker": "1"},
    ]
    setup = fams["sautikit_call_setup_seconds"]
    check_histogram(setup)
    les = [d["le"] for d in setup.series("_bucket")]
    assert les[0] == "0.005" and les[-2:] == ["2.0", "+Inf"]
    fetch = fams["sautikit_callback_fetch_seconds"]
    check_histogram(fetch)
    assert fetch.series("_count") == [{"outcome": "ok"}, {"outcome": "error"}]
    assert fams["sautikit_events_outbox"].get(state="pending") == 3
    assert fams["sautikit_events_outbox"].get(state="delivered") == 40
    assert fams["sautikit_events_outbox"].get(state="dead_letter") == 2
    assert fams["sautikit_events_dead_letters"].get() == 2
    assert node.outbox_queries == 1  # one Outbox.counts() per scrape for both families
    assert fams["sautikit_workers"].get(state="ready") == 2
    assert fams["sautikit_workers"].get(state="down") == 0
    assert fams["sautikit_worker_restarts_total"].get() == 0
    assert fams["sautikit_draining"].get() == 0


def test_node_metrics_live_values() -> None:
    node = FakeNode()
    m = node.metrics()
    node.calls = [
        {"call_id": "a", "direction": "inbound", "worker": 0},
        {"call_id": "b", "direction": "inbound", "worker": 0},
        {"call_id": "c", "direction": "inbound", "worker": 1},
    ]
    node.workers = [(0, True), (1, False)]
    node.outbox = {"pending": 1, "delivered": 0, "dead_letter": 9}
    m.worker_restarted()
    m.set_draining(True)
    fams = parse(m.render())
    active = fams["sautikit_active_calls"]
    assert active.get(direction="inbound", worker="0") == 2
    assert active.get(direction="inbound", worker="1") == 1
    assert active.get(direction="outbound", worker="1") == 0
    assert fams["sautikit_workers"].get(state="down") == 1
    assert fams["sautikit_events_dead_letters"].get() == 9
    assert fams["sautikit_worker_restarts_total"].get() == 1
    assert fams["sautikit_draining"].get() == 1
    m.set_draining(False)
    node.outbox = None  # before the outbox is open: no outbox samples, no error
    fams = parse(m.render())
    assert fams["sautikit_draining"].get() == 0
    assert fams["sautikit_events_outbox"].samples == {}
    assert fams["sautikit_events_dead_letters"].samples == {}


def test_node_metrics_observe_worker_messages() -> None:
    m = FakeNode().metrics()
    assert m.observe({"t": "metric", "name": "setup_seconds", "value": 0.012})
    assert m.observe(msg(Metric(name="setup_seconds", value=1.5)))
    assert m.observe(
        {"t": "metric", "name": "callback_fetch_seconds", "value": 0.004, "outcome": "ok"}
    )
    assert m.observe(msg(Metric(name="callback_fetch_seconds", value=3.0, outcome="error")))
    assert m.observe({"t": "final", "status": "completed"})
    assert m.observe(msg(Final(status="completed")))
    assert m.observe(msg(Final(status="no_answer")))
    m.call_final("failed")  # a call lost with its worker
    fams = parse(m.render())
    setup = fams["sautikit_call_setup_seconds"]
    assert setup.get("_count") == 2
    assert setup.get("_sum") == pytest.approx(1.512)
    assert setup.get("_bucket", le="0.01") == 0
    assert setup.get("_bucket", le="0.025") == 1
    assert setup.get("_bucket", le="2.0") == 2
    fetch = fams["sautikit_callback_fetch_seconds"]
    assert fetch.get("_bucket", outcome="ok", le="0.005") == 1
    assert fetch.get("_count", outcome="error") == 1
    assert fetch.get("_bucket", outcome="error", le="2.0") == 0
    assert fetch.get("_bucket", outcome="error", le="5.0") == 1
    calls = fams["sautikit_calls_total"]
    assert calls.get(status="completed") == 2
    assert calls.get(status="no_answer") == 1
    assert calls.get(status="failed") == 1
    assert calls.get(status="busy") == 0


def test_node_metrics_ignores_other_messages_and_drops_bad_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = FakeNode().metrics()
    before = m.render()
    for msg in ({"t": "event"}, {"t": "call", "call": {}}, {"t": "ended", "call_id": "x"}, {}):
        assert m.observe(msg) is False
    bad: list[dict[str, Any]] = [
        {"t": "final", "status": "exploded"},  # not a final status: no new series
        {"t": "final"},
        {"t": "metric", "name": "setup_seconds", "value": -1},
        {"t": "metric", "name": "setup_seconds", "value": "0.1"},
        {"t": "metric", "name": "setup_seconds", "value": math.nan},
        {"t": "metric", "name": "setup_seconds", "value": math.inf},
        {"t": "metric", "name": "setup_seconds", "value": True},
        {"t": "metric", "name": "setup_seconds"},
        {"t": "metric", "name": "callback_fetch_seconds", "value": 0.1, "outcome": "maybe"},
        {"t": "metric", "name": "callback_fetch_seconds", "value": 0.1},
        {"t": "metric", "name": "nope", "value": 1},
    ]
    with caplog.at_level(logging.WARNING, "gateway.metrics"):
        for msg in bad:
            assert m.observe(msg) is True
    assert m.render() == before
    assert len(caplog.records) == len(bad)


def test_each_node_has_its_own_registry() -> None:
    a, b = FakeNode().metrics(), FakeNode().metrics()
    a.observe(msg(Final(status="completed")))
    a.worker_restarted()
    assert parse(a.render())["sautikit_calls_total"].get(status="completed") == 1
    fams = parse(b.render())
    assert fams["sautikit_calls_total"].get(status="completed") == 0
    assert fams["sautikit_worker_restarts_total"].get() == 0
    # nothing lands in the library's process-wide registry
    assert "sautikit_calls_total" not in render(prometheus_client.REGISTRY)


def test_label_children_are_looked_up_once() -> None:
    # Per-call updates add to a kept child: no .labels(...) lookup per message.
    m = FakeNode().metrics()
    kept = dict(m._calls_by_status), dict(m._fetch_by_outcome)
    for _ in range(3):
        m.observe(msg(Final(status="busy")))
        m.observe(msg(Metric(name="callback_fetch_seconds", value=0.1, outcome="ok")))
        m.observe(msg(Metric(name=ACTION_SKIPPED, verb="say", reason="tts_failed")))
    assert (m._calls_by_status, m._fetch_by_outcome) == kept
    assert list(m._skipped) == [("say", "tts_failed")]
    fams = parse(m.render())
    assert fams["sautikit_calls_total"].get(status="busy") == 3
    assert fams["sautikit_callback_fetch_seconds"].get("_count", outcome="ok") == 3
    assert fams["sautikit_actions_skipped_total"].get(verb="say", reason="tts_failed") == 3


def test_workers_do_not_import_prometheus_client() -> None:
    # Only the supervisor serves /metrics: a worker process sends Metric messages and keeps
    # the library's import (~1.4 MB, ~0.1 s per process) off its footprint.
    import subprocess
    import sys

    code = "import sys, gateway.workers.worker; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


async def test_node_metrics_show_the_outbox_as_of_the_scrape(tmp_path) -> None:
    """/metrics awaits a fresh count (bounded) before it renders: not the previous scrape's."""
    from config.settings import Settings
    from gateway.events.envelope import make_event
    from gateway.events.outbox import AsyncOutbox, Outbox
    from gateway.node import Node

    node = Node(Settings.model_validate({"api": {"token": "t" * 32},
                                         "storage": {"dir": str(tmp_path)}}), None)
    node.outbox = await AsyncOutbox.open(tmp_path / "outbox.sqlite3")
    await node.refresh_metrics()
    assert 'sautikit_events_outbox{state="pending"} 0.0' in node.metrics_text()
    with Outbox(tmp_path / "outbox.sqlite3") as sync:
        ev = make_event("call.started", "ws", {"call_id": "c"})
        sync.append(ev, url="https://cp.example/e", secret="s", policy="customer", call_id="c")
    await node.refresh_metrics()
    assert 'sautikit_events_outbox{state="pending"} 1.0' in node.metrics_text()
    await node.outbox.aclose()


def test_stream_metrics_count_opened_by_kind_and_ended_by_reason() -> None:
    node = FakeNode()
    m = node.metrics()
    assert m.observe({"t": "metric", "name": "stream_opened", "verb": "ai_agent"})
    assert m.observe({"t": "metric", "name": "stream_ended", "reason": "handover"})
    assert m.observe({"t": "metric", "name": "stream_ended", "reason": "nonsense"})
    fams = parse(m.render())
    assert fams["sautikit_streams_opened_total"].get(kind="ai_agent") == 1
    assert fams["sautikit_streams_opened_total"].get(kind="stream") == 0
    assert fams["sautikit_streams_ended_total"].get(reason="handover") == 1
