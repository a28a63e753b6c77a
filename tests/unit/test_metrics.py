"""Prometheus text format 0.0.4 from gateway.metrics, read back with a strict little parser."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.metrics import (
    CALL_SETUP_BUCKETS,
    CONTENT_TYPE,
    NodeMetrics,
    Registry,
    callback_fetch_msg,
    final_msg,
    setup_seconds_msg,
)

# -- a parser for the text exposition format (what Prometheus would accept) -------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_HELP_RE = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE_RE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
_SAMPLE_NAME_RE = re.compile(rf"^({_NAME})")
_LABEL_NAME_RE = re.compile(rf"({_LABEL})=\"")
_VALUE_RE = re.compile(r"^ ([^ ]+)$")  # we never write timestamps
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": (), "gauge": ()}

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str
    help: str | None = None
    type: str | None = None
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def get(self, suffix: str = "", **labels: str) -> float:
        for (name, lbls), value in self.samples.items():
            if name == self.name + suffix and dict(lbls) == labels:
                return value
        raise KeyError((suffix, labels))

    def series(self, suffix: str = "") -> list[dict[str, str]]:
        return [dict(lbls) for (name, lbls) in self.samples if name == self.name + suffix]


def _unescape_help(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "\\n":
            out.append("\n" if text[i + 1] == "n" else "\\")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _parse_labels(text: str, pos: int) -> tuple[Labels, int]:
    """text[pos] == "{"; returns the labels and the index just past "}"."""
    assert text[pos] == "{"
    pos += 1
    labels: list[tuple[str, str]] = []
    while text[pos] != "}":
        m = _LABEL_NAME_RE.match(text, pos)
        assert m, f"bad label name at {text[pos:]!r}"
        pos = m.end()
        value: list[str] = []
        while True:
            c = text[pos]
            if c == "\\":
                nxt = text[pos + 1]
                assert nxt in '\\"n', f"bad escape \\{nxt} in {text!r}"
                value.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
                pos += 2
            elif c == '"':
                pos += 1
                break
            else:
                assert c != "\n"
                value.append(c)
                pos += 1
        labels.append((m.group(1), "".join(value)))
        if text[pos] == ",":
            pos += 1
            assert text[pos] != "}", "we do not write trailing commas"
        else:
            assert text[pos] == "}", f"expected , or }} at {text[pos:]!r}"
    names = [n for n, _ in labels]
    assert len(names) == len(set(names)), f"duplicate label in {text!r}"
    return tuple(labels), pos + 1


def _parse_value(raw: str) -> float:
    if raw in ("+Inf", "-Inf", "NaN"):
        return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}[raw]
    assert re.fullmatch(r"-?[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?", raw), raw
    return float(raw)


def parse(text: str) -> dict[str, Family]:
    """Strict: HELP then TYPE before a family's samples, families not interleaved, no duplicate
    series, sample names the family's (plus the type's suffixes), final newline."""
    assert text == "" or text.endswith("\n")
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if m := _HELP_RE.match(line):
            assert m.group(1) not in families, f"family {m.group(1)} twice"
            current = families[m.group(1)] = Family(m.group(1), help=_unescape_help(m.group(2)))
            continue
        if m := _TYPE_RE.match(line):
            assert current is not None and current.name == m.group(1) and current.type is None
            assert not current.samples, "TYPE after samples"
            current.type = m.group(2)
            continue
        assert not line.startswith("#"), f"stray comment {line!r}"
        assert current is not None and current.type is not None, f"sample before TYPE: {line!r}"
        m = _SAMPLE_NAME_RE.match(line)
        assert m, line
        name, pos = m.group(1), m.end()
        assert name in [current.name + s for s in ("", *_SUFFIXES[current.type])], (
            f"{name} in family {current.name}"
        )
        labels: Labels = ()
        if pos < len(line) and line[pos] == "{":
            labels, pos = _parse_labels(line, pos)
        v = _VALUE_RE.match(line[pos:])
        assert v, f"bad value part in {line!r}"
        key = (name, labels)
        assert key not in current.samples, f"duplicate series {key}"
        current.samples[key] = _parse_value(v.group(1))
    return families


def check_histogram(fam: Family) -> None:
    """Per label set: le ascending and ending in +Inf, counts cumulative, +Inf == _count."""
    assert fam.type == "histogram"
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for (name, labels), value in fam.samples.items():
        if name == fam.name + "_bucket":
            rest = tuple(kv for kv in labels if kv[0] != "le")
            assert labels[-1][0] == "le"
            groups.setdefault(rest, []).append((_parse_value(dict(labels)["le"]), value))
    assert groups
    for rest, buckets in groups.items():
        les = [le for le, _ in buckets]
        assert les == sorted(les) and les[-1] == math.inf
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), f"not cumulative: {counts}"
        assert fam.samples[(fam.name + "_count", rest)] == counts[-1]
        assert (fam.name + "_sum", rest) in fam.samples


# -- Registry ---------------------------------------------------------------------------------


def test_counter_gauge_text_exact() -> None:
    r = Registry()
    c = r.counter("app_requests_total", "Requests served.", ["method", "code"])
    c.labels(method="GET", code=200).inc()
    c.labels(method="GET", code="200").inc(2)
    c.labels(method="POST", code="500").inc(0.5)
    g = r.gauge("app_temperature", "Temperature.")
    g.set(-3.25)
    assert r.render() == (
        "# HELP app_requests_total Requests served.\n"
        "# TYPE app_requests_total counter\n"
        'app_requests_total{method="GET",code="200"} 3.0\n'
        'app_requests_total{method="POST",code="500"} 0.5\n'
        "# HELP app_temperature Temperature.\n"
        "# TYPE app_temperature gauge\n"
        "app_temperature -3.25\n"
    )


def test_histogram_text_exact_and_cumulative() -> None:
    r = Registry()
    h = r.histogram("lat_seconds", "Latency.", [0.01, 0.1, 1])
    for v in (0.005, 0.01, 0.05, 0.1, 0.5, 3.0):  # bounds themselves fall in their bucket (le)
        h.observe(v)
    assert r.render() == (
        "# HELP lat_seconds Latency.\n"
        "# TYPE lat_seconds histogram\n"
        'lat_seconds_bucket{le="0.01"} 2\n'
        'lat_seconds_bucket{le="0.1"} 4\n'
        'lat_seconds_bucket{le="1.0"} 5\n'
        'lat_seconds_bucket{le="+Inf"} 6\n'
        f"lat_seconds_sum {0.005 + 0.01 + 0.05 + 0.1 + 0.5 + 3.0!r}\n"
        "lat_seconds_count 6\n"
    )
    check_histogram(parse(r.render())["lat_seconds"])


def test_labelled_histogram_parses_back() -> None:
    r = Registry()
    h = r.histogram("fetch_seconds", "Fetch.", CALL_SETUP_BUCKETS, ["outcome"])
    for i in range(50):
        h.labels(outcome="ok").observe(i * 0.01)
    h.labels(outcome="error").observe(5)
    fam = parse(r.render())["fetch_seconds"]
    check_histogram(fam)
    assert fam.get("_count", outcome="ok") == 50
    assert fam.get("_bucket", outcome="ok", le="0.25") == 26  # 0.00 .. 0.25 inclusive
    assert fam.get("_bucket", outcome="error", le="2.0") == 0
    assert fam.get("_bucket", outcome="error", le="+Inf") == 1
    assert fam.get("_sum", outcome="error") == 5.0
    assert fam.series("_sum") == [{"outcome": "ok"}, {"outcome": "error"}]


def test_escaping_round_trips() -> None:
    nasty = 'a\\b"c\nd}e,f=g'
    r = Registry()
    r.counter("esc_total", 'Help with a \\ backslash\nand a "quote".', ["v"]).labels(v=nasty).inc()
    text = r.render()
    assert 'esc_total{v="a\\\\b\\"c\\nd}e,f=g"} 1.0\n' in text
    assert '# HELP esc_total Help with a \\\\ backslash\\nand a "quote".\n' in text
    assert len(text.splitlines()) == 3  # the newlines stayed escaped
    fam = parse(text)["esc_total"]
    assert fam.help == 'Help with a \\ backslash\nand a "quote".'
    assert fam.get(v=nasty) == 1.0


def test_special_values() -> None:
    r = Registry()
    g = r.gauge("g", "G.", ["k"])
    g.labels(k="inf").set(math.inf)
    g.labels(k="ninf").set(-math.inf)
    g.labels(k="nan").set(math.nan)
    g.labels(k="big").set(1e21)
    text = r.render()
    assert 'g{k="inf"} +Inf\n' in text and 'g{k="ninf"} -Inf\n' in text
    assert 'g{k="nan"} NaN\n' in text
    fam = parse(text)["g"]
    assert fam.get(k="big") == 1e21
    assert math.isnan(fam.get(k="nan"))


def test_unlabelled_renders_zero_labelled_renders_nothing_until_used() -> None:
    r = Registry()
    r.counter("a_total", "A.")
    b = r.counter("b_total", "B.", ["x"])
    r.histogram("h", "H.", [1])
    fams = parse(r.render())
    assert fams["a_total"].samples == {("a_total", ()): 0.0}
    assert fams["b_total"].samples == {}
    assert fams["h"].get("_count") == 0
    b.labels(x="1")  # touching a label set creates it at 0
    assert parse(r.render())["b_total"].get(x="1") == 0.0


def test_gauge_fn_evaluated_at_render() -> None:
    r = Registry()
    depth = {"n": 1}
    r.gauge_fn("q_depth", "Queue depth.", lambda: [({"q": "a"}, depth["n"]), ({}, 7)])
    assert parse(r.render())["q_depth"].get(q="a") == 1
    depth["n"] = 5
    fam = parse(r.render())["q_depth"]
    assert fam.get(q="a") == 5 and fam.get() == 7


def test_gauge_fn_failure_does_not_break_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> list[tuple[dict[str, str], float]]:
        raise RuntimeError("source gone")

    r = Registry()
    r.gauge_fn("broken", "Broken.", boom)
    r.gauge_fn("bad_labels", "Bad.", lambda: [({"0bad": "x"}, 1)])
    r.gauge("fine", "Fine.").set(2)
    with caplog.at_level(logging.ERROR, "gateway.metrics"):
        fams = parse(r.render())
    assert fams["broken"].samples == {} and fams["bad_labels"].samples == {}
    assert fams["fine"].get() == 2
    assert "broken" in caplog.text and "bad_labels" in caplog.text


def test_gauge_fn_duplicate_label_set_last_wins() -> None:
    r = Registry()
    r.gauge_fn("d", "D.", lambda: [({"a": "1"}, 1), ({"a": "1"}, 2)])
    assert parse(r.render())["d"].samples == {("d", (("a", "1"),)): 2.0}


@pytest.mark.parametrize(
    "make",
    [
        lambda r: r.counter("0bad", "x"),
        lambda r: r.counter("bad-name", "x"),
        lambda r: r.counter("ok_total", "x", ["__reserved"]),
        lambda r: r.counter("ok_total", "x", ["a", "a"]),
        lambda r: r.counter("ok_total", "x", ["bad-label"]),
        lambda r: r.histogram("h", "x", [1], ["le"]),
        lambda r: r.histogram("h", "x", [2, 1]),
        lambda r: r.histogram("h", "x", [1, 1]),
        lambda r: r.histogram("h", "x", [math.nan]),
    ],
)
def test_invalid_definitions(make: Any) -> None:
    with pytest.raises(ValueError):
        make(Registry())


def test_name_clashes_refused() -> None:
    r = Registry()
    r.histogram("lat", "x", [1])
    for name in ("lat", "lat_bucket", "lat_count", "lat_sum"):
        with pytest.raises(ValueError):
            r.gauge(name, "x")
    r.counter("n_count", "x")
    with pytest.raises(ValueError):
        r.histogram("n", "x", [1])


def test_label_and_value_misuse() -> None:
    r = Registry()
    c = r.counter("c_total", "x", ["a"])
    with pytest.raises(ValueError):
        c.labels(b="1")
    with pytest.raises(ValueError):
        c.labels(a="1", b="2")
    with pytest.raises(ValueError):
        c.inc()  # labelled: needs .labels()
    with pytest.raises(ValueError):
        c.labels(a="1").inc(-1)
    with pytest.raises(ValueError):
        c.labels(a="1").inc(math.nan)
    h = r.histogram("h", "x", [1])
    with pytest.raises(ValueError):
        h.observe(math.nan)


def test_explicit_inf_bucket_not_doubled() -> None:
    r = Registry()
    r.histogram("h", "x", [0.5, math.inf]).observe(1)
    fam = parse(r.render())["h"]
    assert fam.series("_bucket") == [{"le": "0.5"}, {"le": "+Inf"}]
    check_histogram(fam)


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


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
    assert m.observe(setup_seconds_msg(1.5))
    assert m.observe(
        {"t": "metric", "name": "callback_fetch_seconds", "value": 0.004, "outcome": "ok"}
    )
    assert m.observe(callback_fetch_msg(3.0, ok=False))
    assert m.observe({"t": "final", "status": "completed"})
    assert m.observe(final_msg("completed"))
    assert m.observe(final_msg("no_answer"))
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
