"""The figures bench/capacity.py measures, as dataclasses, and their .json (for --render)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

NAN = float("nan")


@dataclass
class LevelResult:
    """One fresh node, one SIPp run against it."""

    level: int
    workers: int
    kind: str = "sweep"  # sweep | bisect | fraction | overload | sustain
    rate: float = 0.0  # SIPp -r
    attempted: int = 0
    ok: int = 0
    failed: int = 0
    sipp_ok: int = 0
    sipp_failed: int = 0
    sipp_rc: int | None = None
    app_complete: int = 0
    app_kinds: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    peak_calls: int = 0
    cps: float = 0.0  # INVITEs sent per second over the run
    ramp_cps: float = 0.0  # ... over the first C calls (before the -l limit holds SIPp back)
    setup_p50: float = NAN
    setup_p99: float = NAN
    setup_max: float = NAN
    call_s_p50: float = NAN
    cpu_pct: float = 0.0
    cpu_peak_pct: float = 0.0
    cpu_loaded_pct: float = NAN  # mean of 1 s samples from first to last INVITE
    idle_cpu_pct: float = 0.0
    cpu_ms_per_call_s: float = NAN
    node_cpu_ms_per_call_s: float = NAN
    node_cpu_share: float = 0.0  # of all busy CPU during the run
    rss_mb: float = 0.0
    rss_idle_mb: float = 0.0
    pss_mb: float = 0.0
    rss_per_call_mb: float = 0.0
    pss_per_call_mb: float = 0.0
    ready_s: float = 0.0  # launch -> `sautikit-gateway ready` in the log
    readyz_s: float = NAN  # launch -> GET /readyz 200
    final_lag_p99: float = NAN
    app_handling_p99: float = NAN
    recording_s_p50: float = NAN
    bad_signatures: int = 0
    reasons: list[str] = field(default_factory=list)
    cpu_split: dict[str, float] = field(default_factory=dict)  # % of the machine, by role
    metrics: dict[str, float] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)
    worker_threads: dict[str, float] = field(default_factory=dict)  # % of the machine
    sipp_cmd: list[str] = field(default_factory=list)
    work: str = ""


@dataclass
class CeilingResult:
    level: int
    workers: int
    ok: int = 0
    failed: int = -1
    cpu_pct: float = NAN
    setup_mean: float = NAN
    rss_mb: float = 0.0
    worker_threads: dict[str, float] = field(default_factory=dict)  # % of the machine
    sipp_s: float = 0.0
    line: str = ""
    cmd: list[str] = field(default_factory=list)


@dataclass
class OverloadResult:
    """1.5x the capacity offered to a node sized for the capacity."""

    capacity: int
    offered: int  # SIPp -l
    run: LevelResult
    invites: int = 0
    answered: int = 0
    answered_ok: int = 0  # answered, then the whole IVR and call.completed
    answered_failed: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # final INVITE code -> calls
    refused_retry_after: int = 0  # refusals that carried Retry-After
    unanswered: int = 0  # no final answer to the INVITE at all
    answered_setup_p99: float = NAN


@dataclass
class SustainSample:
    t: float  # s since the first INVITE
    rss_mb: float
    pss_mb: float
    pending: float  # outbox rows waiting for delivery
    live_calls: float  # the node's sautikit_active_calls
    invites: int  # INVITEs SIPp had sent by then


@dataclass
class SustainResult:
    """Calls at a steady rate (0.8 C / call length) for a while: 0 failures and no growth."""

    capacity: int
    level: int  # concurrent calls aimed at
    target_cps: float
    duration_s: float
    run: LevelResult
    samples: list[SustainSample] = field(default_factory=list)
    rss_slope_mb_min: float = NAN  # linear fit over the last `fit_s`
    pss_slope_mb_min: float = NAN
    fit_from: float = 0.0  # the fit's window: samples from fit_from to fit_from + fit_s
    fit_s: float = 0.0
    pending_start: float = NAN
    pending_end: float = NAN
    pending_max: float = NAN


def capacity(levels: list[tuple[int, int]]) -> int:
    """Highest level with 0 failed calls (0 if none)."""
    return max((lv for lv, failed in levels if failed == 0), default=0)


def clean_up_to(levels: list[tuple[int, int]]) -> int:
    """Highest level below which no level failed either (stricter than `capacity`)."""
    best = 0
    for lv, failed in sorted(levels):
        if failed:
            break
        best = lv
    return best


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return NAN
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return NAN
    return 60 * sum((x - mx) * (y - my) for x, y in points) / sxx


@dataclass
class Sitting:
    """Everything one run of bench/capacity.py measured."""

    started: datetime
    wall_s: float
    levels: list[LevelResult] = field(default_factory=list)
    ceilings: list[CeilingResult] = field(default_factory=list)
    overload: OverloadResult | None = None
    sustain: SustainResult | None = None


SAVED_ARGS = ("argv", "load_before", "commit", "front", "cps", "headroom", "ceiling_cps",
              "ceiling_workers", "quick", "reserved_slots", "calls_per_worker", "overload_only",
              "sustain_only")  # fmt: skip


def _clean(v: Any) -> Any:
    """NaN -> None (strict JSON)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _nan(cls: type[Any], d: dict[str, Any]) -> dict[str, Any]:
    """None back to NaN for the float fields of `cls`."""
    floats = {f.name for f in dataclasses.fields(cls) if f.type in ("float", float)}
    return {k: (NAN if v is None and k in floats else v) for k, v in d.items()}


def save(path: Path, args: argparse.Namespace, s: Sitting) -> None:
    data = {
        "started": s.started.isoformat(),
        "wall_s": s.wall_s,
        "args": {k: getattr(args, k, None) for k in SAVED_ARGS},
        "levels": [dataclasses.asdict(r) for r in s.levels],
        "ceilings": [dataclasses.asdict(c) for c in s.ceilings],
        "overload": dataclasses.asdict(s.overload) if s.overload else None,
        "sustain": dataclasses.asdict(s.sustain) if s.sustain else None,
    }
    path.write_text(json.dumps(_clean(data), indent=1))


def _level(d: dict[str, Any]) -> LevelResult:
    if "pss_per_call_mb" not in d and d.get("pss_mb"):  # a .json from before 2026-12
        d["pss_per_call_mb"] = d["pss_mb"] / d["level"]
    return LevelResult(**_nan(LevelResult, d))


def load(path: Path, args: argparse.Namespace) -> Sitting:
    data = json.loads(path.read_text())
    for k, v in data["args"].items():
        if v is not None or not hasattr(args, k):
            setattr(args, k, v)
    s = Sitting(datetime.fromisoformat(data["started"]), data["wall_s"])
    s.levels = [_level(r) for r in data["levels"]]
    s.ceilings = [CeilingResult(**_nan(CeilingResult, c)) for c in data["ceilings"]]
    if o := data.get("overload"):
        o["run"] = _level(o["run"])
        s.overload = OverloadResult(**_nan(OverloadResult, o))
    if u := data.get("sustain"):
        u["run"] = _level(u["run"])
        u["samples"] = [SustainSample(**_nan(SustainSample, x)) for x in u["samples"]]
        s.sustain = SustainResult(**_nan(SustainResult, u))
    return s
