"""bench/capacity.py's pure logic: the sweep's stop-and-bisect, reading the node's /metrics
(hand-written and prometheus_client expositions), refusals and Retry-After from SIPp's message
trace, the leak fit, and the goals the report marks."""

from __future__ import annotations

import asyncio
import math
import sys
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import capacity  # noqa: E402
import capacity_report  # noqa: E402
from capacity_results import (  # noqa: E402
    LevelResult,
    OverloadResult,
    Sitting,
    SustainResult,
    SustainSample,
    slope_per_min,
)


def run_sweep(levels: list[int], failing_from: int) -> list[tuple[int, str]]:
    ran: list[tuple[int, str]] = []

    async def run(level: int, kind: str) -> int:
        ran.append((level, kind))
        return 1 if level >= failing_from else 0

    asyncio.run(capacity.sweep(levels, run))
    return ran


def test_sweep_stops_at_the_first_failing_level_and_bisects_once() -> None:
    levels = [250, 300, 350, 400, 450]
    assert run_sweep(levels, 400) == [
        (250, "sweep"), (300, "sweep"), (350, "sweep"), (400, "sweep"), (375, "bisect"),
    ]  # fmt: skip
    assert run_sweep(levels, 1000) == [(lv, "sweep") for lv in levels]
    # The first level fails: halfway down to 0, to a multiple of 25.
    assert run_sweep(levels, 200) == [(250, "sweep"), (125, "bisect")]
    # Levels 25 apart leave nothing between: no bisect.
    assert run_sweep([25, 50], 50) == [(25, "sweep"), (50, "sweep")]


HAND_WRITTEN = """\
# TYPE sautikit_events_outbox gauge
sautikit_events_outbox{state="pending"} 7
sautikit_events_outbox{state="delivered"} 1200
sautikit_active_calls{worker="0"} 3
sautikit_active_calls{worker="1"} 4
sautikit_call_setup_seconds_sum 2.5
sautikit_call_setup_seconds_count 100
"""
PROMETHEUS_CLIENT = """\
# HELP sautikit_outbox_pending Outbox rows waiting for delivery.
# TYPE sautikit_outbox_pending gauge
sautikit_outbox_pending 12.0
sautikit_active_calls 5.0
sautikit_call_setup_seconds_bucket{le="0.05"} 90.0
sautikit_call_setup_seconds_sum 1.0
sautikit_call_setup_seconds_count 50.0
sautikit_call_setup_seconds_created 1.79e+09
"""


def test_metrics_are_read_from_either_exposition() -> None:
    assert capacity.outbox_pending(HAND_WRITTEN) == 7
    assert capacity.active_calls(HAND_WRITTEN) == 7
    assert capacity.setup_means(HAND_WRITTEN)["sautikit_call_setup_seconds_mean_ms"] == 25
    assert capacity.outbox_pending(PROMETHEUS_CLIENT) == 12
    assert capacity.active_calls(PROMETHEUS_CLIENT) == 5
    assert capacity.setup_means(PROMETHEUS_CLIENT)["sautikit_call_setup_seconds_mean_ms"] == 20
    assert capacity.outbox_pending("sautikit_active_calls 1\n") is None


def block(stamp: str, direction: str, first: str, call_id: str, *extra: str) -> str:
    return "\n".join(
        [
            f"----------------------------------------------- 2026-12-02 {stamp}",
            direction,
            "",
            first,
            "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1",
            f"Call-ID: {call_id}",
            "CSeq: 1 INVITE",
            *extra,
            "Content-Length: 0",
            "",
            "",
        ]
    )


def test_refusals_and_retry_after_come_from_the_message_trace(tmp_path: Path) -> None:
    sent, received = "UDP message sent (300 bytes):", "UDP message received [300] bytes :"
    trace = "".join(
        [
            block("10:00:00.000000", sent, "INVITE sip:x@127.0.0.1 SIP/2.0", "a"),
            block("10:00:00.010000", received, "SIP/2.0 200 OK", "a"),
            block("10:00:00.020000", sent, "INVITE sip:x@127.0.0.1 SIP/2.0", "b"),
            block("10:00:00.021000", received, "SIP/2.0 503 Busy", "b", "Retry-After: 5"),
            block("10:00:00.030000", sent, "INVITE sip:x@127.0.0.1 SIP/2.0", "c"),
            block("10:00:00.031000", received, "SIP/2.0 503 Busy", "c"),
        ]
    )
    (tmp_path / "ivr_carrier_1_messages.log").write_text(trace)
    calls = capacity.read_messages(tmp_path)
    assert "200" in calls["a"] and calls["a"]["codes"] == []
    assert math.isclose(calls["a"]["200"] - calls["a"]["invite"], 0.010, abs_tol=1e-6)
    assert calls["b"]["codes"] == ["503"] and calls["b"]["retry_after"] is True
    assert calls["c"]["codes"] == ["503"] and calls["c"]["retry_after"] is False


def test_leak_fit_is_mb_per_minute() -> None:
    assert math.isclose(slope_per_min([(t, 100 + t / 60) for t in range(0, 300, 10)]), 1.0)
    assert slope_per_min([(0, 1.0), (10, 1.0)]) != slope_per_min([(0, 1.0), (10, 1.0)])  # NaN


def test_goals_mark_overload_and_sustained_runs() -> None:
    s = Sitting(datetime(2026, 12, 2), 60.0)
    run = LevelResult(level=30, workers=5, kind="overload", ready_s=2.0, readyz_s=2.1)
    s.overload = OverloadResult(capacity=20, offered=30, run=run, invites=80, answered=20,
                                answered_ok=20, refused={"503": 60},
                                refused_retry_after=60)  # fmt: skip
    flat = [SustainSample(t, 500.0, 300.0, 0, 16, t) for t in range(10, 310, 10)]
    s.sustain = SustainResult(capacity=20, level=16, target_cps=1.8, duration_s=300,
                              run=LevelResult(level=16, workers=5, kind="sustain"),
                              samples=flat, pss_slope_mb_min=0.0, rss_slope_mb_min=0.0,
                              fit_s=240, pending_start=0, pending_end=1,
                              pending_max=2)  # fmt: skip
    marks = {goal: ok for goal, _, ok in capacity_report.goals(s)}
    assert marks["overload at 1.5× capacity: 0 answered calls fail"] is True
    refused_goal = next(g for g in marks if g.startswith("overload: every call"))
    assert marks[refused_goal] is True
    sustained = next(g for g in marks if g.startswith("sustained rate"))
    assert marks[sustained] is True
    # An answered call that broke, a refusal without Retry-After, growing memory: not met.
    s.overload.answered_failed, s.overload.refused_retry_after = 1, 59
    s.sustain.pss_slope_mb_min = 10.0
    marks = {goal: ok for goal, _, ok in capacity_report.goals(s)}
    assert marks["overload at 1.5× capacity: 0 answered calls fail"] is False
    assert marks[refused_goal] is False
    assert marks[sustained] is False
