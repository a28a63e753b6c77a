"""bench/capacity.py's report (markdown) and plot, from a Sitting (a run's figures or its .json).

The report opens with the issue's goals, each marked met or not with its figure.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import psutil
from capacity_results import (
    CeilingResult,
    LevelResult,
    OverloadResult,
    Sitting,
    SustainResult,
    capacity,
    clean_up_to,
)

CEILING_CALLS_PER_WORKER = 4
P99_GOAL_MS = 150.0
P99_AT_80_GOAL_MS = 50.0
RATIO_GOAL = 0.85
FAST_RATIO_GOAL = 0.75
PSS_PER_CALL_GOAL_MB = 10.0
READY_WORKERS = 150
READY_GOAL_S = 10.0
MEM_GROWTH_LIMIT = 0.02  # of the tree's PSS over the fit window: more is growth
EVENTS_PER_CALL = 4
LEAK_WINDOW_NOTE = "4 minutes or less"


def rel(path: str) -> str:
    here = f"{Path.cwd()}/"
    return os.path.relpath(path) if path.startswith(here) else path


def fmt_row(r: LevelResult) -> str:
    return (
        f"level {r.level}: ok {r.ok} failed {r.failed} peak {r.peak_calls} cps {r.cps:.1f} "
        f"INVITE->200 p50 {r.setup_p50:.1f} p99 {r.setup_p99:.1f} ms; CPU {r.cpu_pct:.0f}% "
        f"(peak {r.cpu_peak_pct:.0f}%, {r.cpu_ms_per_call_s:.1f} ms/call-s); "
        f"RSS {r.rss_mb:.0f} MB ({r.rss_per_call_mb:.1f}/call), PSS {r.pss_mb:.0f} MB "
        f"({r.pss_per_call_mb:.1f}/call)"
    )


def overload_line(o: OverloadResult) -> str:
    refused = ", ".join(f"{code} x{n}" for code, n in o.refused.items()) or "none"
    return (
        f"{o.invites} INVITEs at {o.run.cps:.1f}/s to {o.run.workers} workers (capacity "
        f"{o.capacity}, -l {o.offered}): answered {o.answered} (completed {o.answered_ok}, "
        f"failed {o.answered_failed}), refused {sum(o.refused.values())} ({refused}; "
        f"{o.refused_retry_after} with Retry-After), no answer {o.unanswered}"
    )


def mem_growth(u: SustainResult) -> tuple[float, float]:
    """(PSS growth over the fit window in MB, the limit in MB)."""
    window = [s.pss_mb for s in u.samples if u.fit_from <= s.t <= u.fit_from + u.fit_s]
    growth = u.pss_slope_mb_min * u.fit_s / 60
    return growth, MEM_GROWTH_LIMIT * (statistics.mean(window) if window else 0.0)


def outbox_limit(u: SustainResult) -> float:
    """One second of events, at least 10 rows: more pending at the end than at the start is
    growth."""
    return max(10.0, EVENTS_PER_CALL * u.target_cps)


def sustain_ok(u: SustainResult) -> tuple[bool, bool, bool]:
    """(0 failed, no memory growth, no outbox growth)."""
    growth, limit = mem_growth(u)
    mem = not math.isnan(growth) and growth <= limit
    box = math.isnan(u.pending_end) or u.pending_end <= u.pending_start + outbox_limit(u)
    return u.run.failed == 0, mem, box


def sustain_line(u: SustainResult) -> str:
    growth, limit = mem_growth(u)
    r = u.run
    return (
        f"{r.cps:.1f} calls/s (target {u.target_cps:g}) for {u.duration_s:.0f}s, {r.attempted} "
        f"calls, {r.failed} failed; PSS {u.pss_slope_mb_min:+.1f} MB/min, RSS "
        f"{u.rss_slope_mb_min:+.1f} MB/min over t = {u.fit_from:.0f}-{u.fit_from + u.fit_s:.0f} s "
        f"(PSS growth "
        f"{growth:+.0f} MB, limit {limit:.0f}); outbox pending {u.pending_start:g} -> "
        f"{u.pending_end:g} (max {u.pending_max:g})"
    )


def mark(ok: bool | None) -> str:
    return "—" if ok is None else ("**met**" if ok else "**not met**")


def goals(s: Sitting) -> list[tuple[str, str, bool | None]]:
    """(goal, figure, met) for each of the issue's goals that this sitting measured."""
    out: list[tuple[str, str, bool | None]] = []
    gw = [r for r in s.levels if r.kind in ("sweep", "bisect", "fraction")]
    cap = capacity([(r.level, r.failed) for r in gw])
    ccap = capacity([(c.level, c.failed) for c in s.ceilings])
    fast = max((r.level for r in gw if r.failed == 0 and r.setup_p99 < P99_GOAL_MS), default=0)
    if gw and ccap:
        out.append(
            (
                f"capacity / bare ceiling ≥ {RATIO_GOAL}",
                f"{cap} / {ccap} = {cap / ccap:.2f}",
                cap / ccap >= RATIO_GOAL,
            )
        )
        out.append(
            (
                f"capacity with p99 INVITE→200 < {P99_GOAL_MS:.0f} ms / ceiling ≥ "
                f"{FAST_RATIO_GOAL}",
                f"{fast} / {ccap} = {fast / ccap:.2f}",
                fast / ccap >= FAST_RATIO_GOAL,
            )
        )
    elif gw:
        out.append((f"capacity / bare ceiling ≥ {RATIO_GOAL}", f"{cap} (no ceiling run)", None))
    at_cap = next((r for r in gw if r.level == cap), None)
    if at_cap is not None and at_cap.pss_per_call_mb > 0:
        out.append(
            (
                f"PSS per call at capacity ≤ {PSS_PER_CALL_GOAL_MB:.0f} MB",
                f"{at_cap.pss_per_call_mb:.1f} MB PSS ({at_cap.rss_per_call_mb:.1f} MB RSS) "
                f"per call at {cap}",
                at_cap.pss_per_call_mb <= PSS_PER_CALL_GOAL_MB,
            )
        )
    at80 = next((r for r in gw if cap and r.level == max(1, round(0.8 * cap))), None)
    if at80 is not None:
        also = ""
        if s.sustain is not None and s.sustain.capacity == cap:
            also = f"; sustained run at {s.sustain.level}: {s.sustain.run.setup_p99:.1f} ms"
        out.append(
            (
                f"p99 INVITE→200 < {P99_AT_80_GOAL_MS:.0f} ms at 80 % of capacity",
                f"{at80.setup_p99:.1f} ms at {at80.level} ({at80.ramp_cps:.0f}/s ramp){also}",
                at80.setup_p99 < P99_AT_80_GOAL_MS,
            )
        )
    if (o := s.overload) is not None:
        refused = sum(o.refused.values())
        clean = o.unanswered == 0 and set(o.refused) <= {"503"} and o.refused_retry_after == refused
        out.append(
            (
                "overload at 1.5× capacity: 0 answered calls fail",
                f"{o.answered_failed} of {o.answered} answered failed (offered {o.offered} to a "
                f"node for {o.capacity})",
                o.answered_failed == 0,
            )
        )
        out.append(
            (
                "overload: every call beyond capacity refused at the INVITE with 503 + Retry-After",
                f"{refused} refused ({', '.join(f'{c} x{n}' for c, n in o.refused.items()) or '-'}"
                f"), {o.refused_retry_after} with Retry-After, {o.unanswered} unanswered",
                clean and refused > 0,
            )
        )
    runs = [*s.levels, *([s.overload.run] if s.overload else []),
            *([s.sustain.run] if s.sustain else [])]  # fmt: skip
    if runs:
        big = max(runs, key=lambda r: r.workers)
        ready = max(big.ready_s, big.readyz_s) if not math.isnan(big.readyz_s) else big.ready_s
        measured = big.workers >= READY_WORKERS
        out.append(
            (
                f"a node of {READY_WORKERS} workers ready within {READY_GOAL_S:.0f} s",
                f"{big.workers} workers: log ready {big.ready_s:.1f} s, /readyz 200 "
                f"{big.readyz_s:.1f} s"
                + ("" if measured else f" (fewer than {READY_WORKERS}: see bench/node_start.py)"),
                ready <= READY_GOAL_S if measured else None,
            )
        )
    if (u := s.sustain) is not None:
        failed_ok, mem_ok, box_ok = sustain_ok(u)
        out.append(
            (
                f"sustained rate at 80 % of capacity ({u.duration_s:.0f} s; the goal: 300 s): "
                "0 failures, no growth in memory or outbox depth",
                sustain_line(u),
                failed_ok and mem_ok and box_ok,
            )
        )
    return out


def report(args: argparse.Namespace, s: Sitting, plot_note: str, script_path: Path) -> str:
    py, script = rel(sys.executable), rel(str(script_path.absolute()))
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_gb = psutil.virtual_memory().total / 2**30
    cpw = getattr(args, "calls_per_worker", None) or 4
    admit = cpw - args.reserved_slots
    results = sorted(s.levels, key=lambda r: r.level)
    L = [f"# Gateway capacity, {s.started:%Y-%m-%d %H:%M}", ""]
    L.append(
        f"Commit {args.commit}, {os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GB, Python "
        f"{platform.python_version()}, load average before the run "
        f"{args.load_before:.2f}; whole run {s.wall_s / 60:.1f} min."
    )
    L.append(
        f"IVR mix per call: say (2.8 s) -> getDigits (RFC 4733 '1') -> record 5 s (+0.2 s beep) "
        f"-> hangup; three voice app requests and four events per call, all on loopback. "
        f"SIPp through the node's Kamailio (front `{args.front}`), `-l C -m 2C -r {args.cps}`. "
        f"Workers: `calls_per_worker = {cpw}`, `reserved_slots = "
        f"{args.reserved_slots}`: {admit} admitted per worker, count = ceil(C/{admit})"
        + (f" + {args.headroom:.0%} headroom." if args.headroom else ".")
    )
    gl = goals(s)
    if gl:
        L += ["", "## Goals (issue 9)", "", "| goal | figure | |", "|---|---|---|"]
        L += [f"| {g} | {fig} | {mark(ok)} |" for g, fig, ok in gl]
    if results:
        L += levels_table(results, admit)
    if s.ceilings:
        L += ceiling_section(args, results, s.ceilings)
    if s.overload is not None:
        L += overload_section(s.overload)
    if s.sustain is not None:
        L += sustain_section(s.sustain)
    for r in (r for r in results if r.profile):
        L += ["", f"### Profile at level {r.level}", "", "```", *r.profile, "```"]
    L += ["", "## Commands", "", "```"]
    L.append(f"{py} {script} {shlex.join(args.argv)}   # this whole run")
    front = "" if args.front == "managed" else f" --front {args.front}"
    what_if = "".join(
        f" --{k.replace('_', '-')} {v:g}"
        for k, v in (("reserved_slots", args.reserved_slots), ("headroom", args.headroom))
        if v
    )
    for r in results:
        L.append(
            f"{py} {script} --levels {r.level} --cps {args.cps} --no-ceiling --no-fractions "
            f"--no-overload --sustain-s 0{front}{what_if}   # level {r.level}"
        )
    for c in sorted(s.ceilings, key=lambda c: c.level):
        L.append(f"{shlex.join(c.cmd)}   # ceiling {c.level}")
    if s.overload is not None:
        L.append(
            f"{py} {script} --overload-only --capacity {s.overload.capacity} --cps {args.cps}"
            f"{front}{what_if}   # overload"
        )
    if s.sustain is not None:
        u = s.sustain
        L.append(
            f"{py} {script} --sustain-only --capacity {u.capacity} --sustain-level {u.level} "
            f"--sustain-s {u.duration_s:g}{front}{what_if}   # sustained rate"
        )
    if results:
        top = max(results, key=lambda r: r.level)
        L.append(f"# SIPp, as run for level {top.level} (in its work dir):")
        L.append(shlex.join(top.sipp_cmd))
    L.append("```")
    if plot_note:
        L += ["", plot_note]
    return "\n".join(L) + "\n"


def levels_table(results: list[LevelResult], admit: int) -> list[str]:
    L = ["", "## Levels", ""]
    L.append(
        "| concurrent calls (level / peak seen) | workers (ready s: log / readyz) | "
        "calls ok / failed | calls/s (first C calls) | "
        "INVITE→200 p50 / p99 ms | CPU busy %: run (while placing calls; peak 1 s; not ours) | "
        "CPU ms per call-second (node's share) | RSS MB total (idle) | RSS / PSS MB per call |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        tag = "" if r.kind == "sweep" else f" ({r.kind})"
        L.append(
            f"| {r.level}{tag} / {r.peak_calls} | {r.workers} ({r.ready_s:.1f} / "
            f"{r.readyz_s:.1f}) | {r.ok} / {r.failed} | {r.cps:.1f} ({r.ramp_cps:.1f}) | "
            f"{r.setup_p50:.1f} / {r.setup_p99:.1f} | {r.cpu_pct:.0f} ({r.cpu_loaded_pct:.0f}; "
            f"{r.cpu_peak_pct:.0f}; {r.cpu_split.get('other processes', 0):.0f}) | "
            f"{r.cpu_ms_per_call_s:.1f} ({r.node_cpu_share:.0%}) | {r.rss_mb:.0f} "
            f"({r.rss_idle_mb:.0f}) | {r.rss_per_call_mb:.1f} / {r.pss_per_call_mb:.1f} |"
        )
    cap = capacity([(r.level, r.failed) for r in results])
    L += ["", f"**Capacity: {cap} concurrent calls with 0 failed calls** (highest level run "
          f"with none; {admit} admitted per worker)."]  # fmt: skip
    for r in results:
        if r.reasons:
            L.append(f"- level {r.level} failures/notes: " + "; ".join(r.reasons))
    L += ["", "Other per-level figures:"]
    for r in results:
        L.append(
            f"- level {r.level}: INVITE→200 max {r.setup_max:.0f} ms; idle CPU "
            f"{r.idle_cpu_pct:.0f}%; PSS total {r.pss_mb:.0f} MB; call length p50 "
            f"{r.call_s_p50:.1f} s; recording p50 {r.recording_s_p50:.0f} s; call.completed "
            f"delivered p99 {r.final_lag_p99:.0f} ms after it happened; app handling p99 "
            f"{r.app_handling_p99:.2f} ms; voice app requests {r.app_kinds}; events {r.events}"
        )
        L.append(
            "  - worker threads, % of the machine over the SIPp run: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.worker_threads.items())
        )
        L.append(
            "  - CPU by role, % of the machine over the SIPp run: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.cpu_split.items())
        )
        if r.metrics:
            L.append(
                "  - the node's /metrics: setup (INVITE received → 200 sent) mean "
                f"{r.metrics.get('sautikit_call_setup_seconds_mean_ms', float('nan')):.1f} ms, "
                "voice app fetch mean "
                f"{r.metrics.get('sautikit_callback_fetch_seconds_mean_ms', float('nan')):.1f} ms"
            )
    return L


def ceiling_section(
    args: argparse.Namespace, results: list[LevelResult], ceilings: list[CeilingResult]
) -> list[str]:
    L = ["", f"## The bare stack's ceiling, same sitting (`run.sh N {args.ceiling_cps}`)", ""]
    L.append(
        "| concurrent calls | bare workers | calls ok / failed | CPU busy % | "
        "INVITE→200 mean ms | RSS MB total |"
    )
    L.append("|---|---|---|---|---|---|")
    for c in sorted(ceilings, key=lambda c: c.level):
        L.append(
            f"| {c.level} | {c.workers} | {c.ok} / {c.failed} | {c.cpu_pct:.0f} | "
            f"{c.setup_mean:.0f} | {c.rss_mb:.0f} |"
        )
    cap = capacity([(r.level, r.failed) for r in results])
    ccap = capacity([(c.level, c.failed) for c in ceilings])
    L.append("")
    if args.ceiling_workers:
        L.append(
            f"Ceiling run once at {args.ceiling_workers} workers "
            f"({args.ceiling_workers * 4} calls) and taken as its capacity if it had 0 failures."
        )
    ratio = cap / ccap if ccap else float("nan")
    top = max((r.level for r in results), default=0)
    ctop = max(c.level for c in ceilings)
    bound = (
        " Neither failed at the highest level it was run at, so both capacities are at "
        "least these figures: the ratio compares the levels run, not two measured limits."
        if results and cap >= top and ccap >= ctop
        else ""
    )
    L.append(
        f"**Gateway / ceiling capacity = {cap} / {ccap} = {ratio:.2f}** (goal ≥ {RATIO_GOAL})."
        f"{bound}"
    )
    fast = max((r.level for r in results if r.failed == 0 and r.setup_p99 < P99_GOAL_MS), default=0)
    if ccap:
        L.append(
            f"With the INVITE→200 goal too (0 failed and p99 < {P99_GOAL_MS:.0f} ms): "
            f"{fast} / {ccap} = {fast / ccap:.2f} (goal ≥ {FAST_RATIO_GOAL})."
        )
    strict_g = clean_up_to([(r.level, r.failed) for r in results])
    strict_c = clean_up_to([(c.level, c.failed) for c in ceilings])
    if (strict_g, strict_c) != (cap, ccap) and strict_c:
        L.append(
            f"Counting only levels below which nothing failed either: {strict_g} / "
            f"{strict_c} = {strict_g / strict_c:.2f}."
        )
    by = {c.level: c for c in ceilings}
    for r in results:
        cr = by.get(CEILING_CALLS_PER_WORKER * math.ceil(r.level / CEILING_CALLS_PER_WORKER))
        if cr is None or not cr.cpu_pct > 0:  # also skips NaN: run.sh printed nothing
            continue
        note = (
            f" (the gateway failed {r.failed} calls here; its run was stretched by "
            f"stuck calls, {r.cpu_loaded_pct:.0f}% while SIPp was placing calls)"
            if r.failed
            else ""
        )
        L.append(
            f"- at {r.level} calls: gateway CPU {r.cpu_pct:.0f}% vs bare "
            f"{cr.cpu_pct:.0f}% ({r.cpu_pct / cr.cpu_pct:.1f}x){note}; RSS "
            f"{r.rss_mb:.0f} vs {cr.rss_mb:.0f} MB"
        )
        wt = ", ".join(f"{k} {v:.1f}" for k, v in cr.worker_threads.items())
        L.append(f"  - bare worker threads at {cr.level}, % of the machine: {wt}")
    return L


def overload_section(o: OverloadResult) -> list[str]:
    r = o.run
    refused = sum(o.refused.values())
    codes = ", ".join(f"{c} x{n}" for c, n in o.refused.items()) or "-"
    L = ["", f"## Overload: {o.offered} offered (1.5 × {o.capacity}) to a node for {o.capacity}",
         ""]  # fmt: skip
    L.append(
        f"SIPp `-l {o.offered} -m {r.attempted} -r {r.rate:g}` (the sweep's rate, or faster "
        f"when that cannot keep {o.offered} calls of this length up) to {r.workers} workers "
        f"(ready {r.ready_s:.1f} s, /readyz 200 {r.readyz_s:.1f} s); peak concurrent calls "
        f"seen {r.peak_calls}."
    )
    L += ["", "| INVITEs | answered | answered → completed the IVR | answered → failed | "
          "refused at the INVITE (codes) | with Retry-After | no answer | p99 INVITE→200 ms "
          "(answered) | CPU busy % (peak) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    L.append(
        f"| {o.invites} | {o.answered} | {o.answered_ok} | **{o.answered_failed}** | "
        f"{refused} ({codes}) | {o.refused_retry_after} | {o.unanswered} | "
        f"{o.answered_setup_p99:.1f} | {r.cpu_pct:.0f} ({r.cpu_peak_pct:.0f}) |"
    )
    if r.reasons:
        L += ["", "Notes: " + "; ".join(r.reasons)]
    return L


def sustain_section(u: SustainResult) -> list[str]:
    r = u.run
    failed_ok, mem_ok, box_ok = sustain_ok(u)
    growth, limit = mem_growth(u)
    L = ["", f"## Sustained rate: {u.target_cps:g} calls/s for {u.duration_s:.0f} s "
         f"({u.level} concurrent aimed at, node for {u.capacity})", ""]  # fmt: skip
    L.append(
        f"SIPp `-r {u.target_cps:g} -l {u.capacity}`, no call limit, soft stop after "
        f"{u.duration_s:.0f} s; {r.workers} workers (ready {r.ready_s:.1f} s, /readyz 200 "
        f"{r.readyz_s:.1f} s). {r.attempted} calls at {r.cps:.1f}/s, "
        f"{r.ok} ok, **{r.failed} failed**; INVITE→200 p50 / p99 {r.setup_p50:.1f} / "
        f"{r.setup_p99:.1f} ms; CPU busy {r.cpu_pct:.0f} % (peak {r.cpu_peak_pct:.0f})."
    )
    L += ["", "| t s | RSS MB | PSS MB | outbox pending | live calls | INVITEs sent |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for x in u.samples:
        L.append(
            f"| {x.t:.0f} | {x.rss_mb:.0f} | {x.pss_mb:.0f} | {x.pending:g} | "
            f"{x.live_calls:g} | {x.invites} |"
        )
    L.append("")
    L.append(
        f"Leak check over t = {u.fit_from:.0f}-{u.fit_from + u.fit_s:.0f} s (the last "
        f"{LEAK_WINDOW_NOTE} before the soft stop; least squares): PSS "
        f"{u.pss_slope_mb_min:+.2f} MB/min, RSS {u.rss_slope_mb_min:+.2f} MB/min: PSS growth "
        f"{growth:+.0f} MB against a limit of {limit:.0f} MB ({MEM_GROWTH_LIMIT:.0%} of the "
        f"tree): {'no growth' if mem_ok else '**grows**'}. Outbox pending {u.pending_start:g} "
        f"over the window's first 30 s, {u.pending_end:g} over its last (medians of 3 "
        f"samples; max {u.pending_max:g}; "
        f"limit start + {outbox_limit(u):.0f}): {'no growth' if box_ok else '**grows**'}. "
        f"Calls: {'0 failed' if failed_ok else f'**{r.failed} failed**'}."
    )
    if r.reasons:
        L.append("Notes: " + "; ".join(r.reasons))
    return L


def plot(s: Sitting, path: Path) -> str:
    if not s.levels:
        return ""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot skipped: matplotlib is not installed (pip install matplotlib)."
    rs = sorted(s.levels, key=lambda r: r.level)
    cs = sorted(s.ceilings, key=lambda c: c.level)
    x = [r.level for r in rs]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.4))
    ax[0].plot(x, [r.setup_p99 for r in rs], "o-", label="p99")
    ax[0].plot(x, [r.setup_p50 for r in rs], "s--", label="p50")
    ax[0].axhline(P99_GOAL_MS, color="red", lw=0.8, ls=":", label="goal: p99 150 ms")
    ax[0].set_yscale("log")
    ax[0].set_title("INVITE→200 (voice app fetch included)")
    ax[0].set_ylabel("ms (log scale)")
    ax[1].plot(x, [r.cpu_loaded_pct for r in rs], "o-", label="gateway, while placing calls")
    ax[1].plot(x, [r.cpu_pct for r in rs], "o:", color="C0", alpha=0.5,
               label="gateway, whole SIPp run")  # fmt: skip
    if cs:
        ax[1].plot([c.level for c in cs], [c.cpu_pct for c in cs], "s--", label="bare ceiling")
    ax[1].set_title("CPU busy, whole machine")
    ax[1].set_ylabel("% of all cores")
    ax[1].set_ylim(0, 100)
    ax[2].plot(x, [r.rss_mb for r in rs], "o-", label="gateway tree RSS")
    if any(r.pss_mb for r in rs):
        ax[2].plot(x, [r.pss_mb for r in rs], "^:", label="gateway tree PSS")
    if cs:
        ax[2].plot([c.level for c in cs], [c.rss_mb for c in cs], "s--", label="bare ceiling RSS")
    ax[2].set_title("Memory")
    ax[2].set_ylabel("MB")
    failed = [r for r in rs if r.failed]
    for a, ys in (
        (ax[0], [r.setup_p99 for r in failed]),
        (ax[1], [r.cpu_loaded_pct for r in failed]),
        (ax[2], [r.rss_mb for r in failed]),
    ):
        if failed:
            a.scatter([r.level for r in failed], ys, marker="x", s=80, color="red", zorder=5,
                      label="level with failed calls")  # fmt: skip
    for a in ax:
        a.set_xlabel("concurrent calls")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("Sautikit gateway node, IVR mix (say → getDigits → record 5 s → hangup)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"Plot: {rel(str(path))}"
