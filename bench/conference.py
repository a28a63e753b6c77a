"""A conference room across workers: who hears whom, and the one-way latency the cascade adds.

    PYTHONPATH=. .venv/bin/python bench/conference.py [--workers 3] [--per-worker 2]
        [--participants 6] [--cycles 4] [--keep]

Starts a real node (`gateway.cli run`, managed Kamailio, `--workers` workers of
`--per-worker` calls), a voice app that puts every caller in room "bench", and phone farms
(tests/integration/tonephones.py, 3 calls a farm) whose phones each send their own tone and
record what they hear. Then:

1. every phone hears every other phone and not itself (Goertzel levels, tests/tones.py);
2. latency, on audio: everyone is muted through the API; a speaker S on a non-hub worker is
   unmuted and muted again `--cycles` times. Its tone's onset is found in the recordings of
   R (S's own worker: no link), F (another non-hub worker: S → hub → F, two link hops) and,
   as a calibration of the two recordings' clocks, the onset of a hub participant Q heard by
   R and F (one hop each: the same path length). The cascade's added latency is
   (onset_F(S) - onset_R(S)) - (onset_F(Q) - onset_R(Q)): two link hops, member to member,
   as far apart as a room of one node gets;
3. CPU of every worker process over the run (user + system), and per worker-second.

Prints one JSON object. With 16 or more participants use more workers (the default node
takes 2 calls per worker here so that a small room spans 3 workers).

    PYTHONPATH=. .venv/bin/python bench/conference.py --nodes 2 [--cycles 4]

Two clustered nodes (two gateway processes, each 2 workers of 2 calls, its own managed
Kamailio and storage), a room of 8, 4 callers on each node; the room's home is node "a".
Everyone hears the other 7 and not themselves. Latency of the three-level cascade (worker ->
node hub -> home hub -> worker, three link hops), on audio: S and R share a non-hub worker of
the other node, S2 and F a non-hub worker of the home. S speaks: F hears it through the cascade,
R locally; S2 speaks: R through the cascade, F locally. With the two recordings' clock
offset c, d1 = t_F(S) - t_R(S) = L + c and d2 = t_F(S2) - t_R(S2) = -L + c, so the added
one-way latency, member to member across nodes, is L = (d1 - d2) / 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.demo import free_port_block  # noqa: E402
from tests import tones  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    NUMBER,
    VoiceApp,
    start_gateway,
    worker_pids,
    write_config,
)
from tests.integration.tonephones import PhoneFarm  # noqa: E402

AUTH = {"Authorization": "Bearer test-token"}
PER_FARM = 3


async def api(port: int, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"http://127.0.0.1:{port}{path}", json=body,
                                headers=AUTH) as r:
            return await r.json()


def tone_for(i: int) -> int:
    """Distinct test tones: DTMF rows/columns first, then tones between them (all >= 60 Hz
    apart, none near the hold tone or the beep)."""
    base = [*tones.TEST_TONES, 620, 1100, 1270, 1400, 1550, 1700, 1760, 1830, 1900, 1970,
            2040, 2110, 2180, 2250, 2320, 2390, 2460, 2530, 2600, 2670, 2740, 2810]
    return base[i]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--per-worker", type=int, default=2)
    ap.add_argument("--participants", type=int, default=6)
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--heard-dbfs", type=float, default=tones.HEARD_DBFS,
                    help="a tone above this level counts as heard (lower it for big rooms)")
    ap.add_argument("--nodes", type=int, default=1, choices=(1, 2))
    args = ap.parse_args()
    if args.nodes == 2:
        await main_nodes(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-conf-"))
    app_obj = VoiceApp(secret=secrets.token_hex(8))
    app_obj.script = lambda req, form: {"actions": [{"conference": {"name": "bench"}}]}
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_obj.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    app_obj.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    base = free_port_block(args.workers)
    cfg = write_config(
        work, voice_url=f"{app_obj.base_url}/voice", app_secret=app_obj.secret,
        events_url=None,
        workers=f"count = {args.workers}\ncalls_per_worker = {args.per_worker}\n"
                f"reserved_slots = 0\nsip_port_start = {base}",
        kamailio='mode = "managed"\nping_interval_s = 1\n')
    gw = start_gateway(cfg, work, timeout=60)
    farms: list[PhoneFarm] = []
    out: dict[str, Any] = {"workers": args.workers, "per_worker": args.per_worker,
                           "participants": args.participants}
    try:
        n_farms = -(-args.participants // PER_FARM)
        farms = list(await asyncio.gather(*(PhoneFarm(work, name=f"farm{i}").start()
                                            for i in range(n_farms))))
        calls: dict[int, tuple[PhoneFarm, str]] = {}
        for i in range(args.participants):
            hz = tone_for(i)
            farm = farms[i // PER_FARM]
            cid = await farm.call(f"sip:{NUMBER}@127.0.0.1:{gw.sip_port}", hz,
                                  from_user=f"+2547110{i:05d}")
            calls[hz] = (farm, cid)
            await farm.wait(cid, "answered", 15)
        room: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            room = (await api(gw.api_port, "GET", "/v1/conferences/bench")).get("conference", {})
            if room.get("participant_count") == args.participants:
                break
            await asyncio.sleep(0.2)
        out["room_workers"] = len(room["workers"])
        by_call = {r["form"]["callId"]: int(r["form"]["from"][-5:])
                   for r in app_obj.requests if "callId" in r["form"]}
        parts = [{**p, "hz": tone_for(by_call[p["call_id"]])} for p in room["participants"]]
        pids = worker_pids(gw)
        cpu0 = _cpu(pids)
        t_cpu0 = time.monotonic()

        # 1. everyone hears everyone else, not themselves
        t0 = time.time()
        await asyncio.sleep(2.0)
        t1 = time.time()
        await asyncio.sleep(0.4)
        # A phone hears n-1 tones mixed into one G.711 stream: each is quieter the bigger the
        # room, so the matrix is judged on the gap between the quietest tone that should be
        # there and the loudest that should not (the own tone included).
        all_hz = [p["hz"] for p in parts]
        quietest, loudest = 0.0, -200.0
        wrong = {}
        for p in parts:
            farm, cid = calls[p["hz"]]
            x, rate = farm.recording(cid)
            lv = tones.levels(x, rate, all_hz, farm.offset(cid, t0) + 0.5, farm.offset(cid, t1))
            present = [db for f, db in lv.items() if f != p["hz"]]
            quietest = min(quietest, min(present))
            loudest = max(loudest, lv[p["hz"]])
            got = {f for f, db in lv.items() if db > args.heard_dbfs}
            if got != set(all_hz) - {p["hz"]}:
                wrong[p["hz"]] = sorted(got ^ (set(all_hz) - {p["hz"]}))
        out["hear_matrix_ok"] = not wrong
        out["hear_matrix_wrong"] = wrong  # phone -> tones wrongly heard or missed
        out["quietest_expected_dbfs"] = round(quietest, 1)
        out["loudest_own_tone_dbfs"] = round(loudest, 1)

        # 2. latency: S and R on one non-hub worker, F on another, Q on the hub
        hub = room["hub_worker"]
        on: dict[int, list[dict[str, Any]]] = {}
        for p in parts:
            on.setdefault(p["worker"], []).append(p)
        leaves = [w for w in on if w != hub and len(on[w]) >= 2]
        others = [w for w in on if w != hub]
        if not leaves or len(others) < 2 or len(on[hub]) < 1:
            raise SystemExit(f"the room's placement does not allow the measurement: {on}")
        w1 = leaves[0]
        w2 = next(w for w in others if w != w1)
        s, r = on[w1][0], on[w1][1]
        f, q = on[w2][0], on[hub][0]
        out["latency_roles"] = {"speaker_worker": w1, "far_worker": w2, "hub_worker": hub}
        for p in parts:
            await _mute(gw.api_port, p["call_id"], True)
        await asyncio.sleep(0.8)
        added, raw, calib = [], [], []
        for _ in range(args.cycles):
            on_s = await _step(gw.api_port, s, calls, [r, f])
            on_q = await _step(gw.api_port, q, calls, [r, f])
            if None in on_s.values() or None in on_q.values():
                continue
            d_s = on_s[f["hz"]] - on_s[r["hz"]]
            d_q = on_q[f["hz"]] - on_q[r["hz"]]
            raw.append(d_s * 1000)
            calib.append(d_q * 1000)
            added.append((d_s - d_q) * 1000)
        out["latency"] = {
            "cycles": len(added),
            "two_hops_added_ms": [round(v, 1) for v in added],
            "two_hops_added_ms_median": round(statistics.median(added), 1) if added else None,
            "uncalibrated_ms": [round(v, 1) for v in raw],
            "calibration_ms": [round(v, 1) for v in calib],
        }
        seconds = time.monotonic() - t_cpu0
        cpu1 = _cpu(pids)
        out["worker_cpu_pct"] = {w: round(100 * (cpu1.get(w, 0) - cpu0.get(w, 0)) / seconds, 1)
                                 for w in sorted(cpu0)}
        out["room_members_per_worker"] = {w: len(v) for w, v in sorted(on.items())}
    finally:
        await asyncio.gather(*(fm.stop() for fm in farms), return_exceptions=True)
        gw.stop()
        await runner.cleanup()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            out["work_dir"] = str(work)
    print(json.dumps(out, indent=1))


CLUSTER_TOKEN = "bench-cluster-token"


async def main_nodes(args: argparse.Namespace) -> None:
    from gateway.cluster.membership import rendezvous
    from tests.integration.conftest import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-conf-nodes-"))
    app_obj = VoiceApp(secret=secrets.token_hex(8))
    app_obj.script = lambda req, form: {"actions": [{"conference": {"name": "bench"}}]}
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_obj.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    app_obj.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    home_id = rendezvous(("ws_1", "bench"), {"a", "b"})
    other_id = "b" if home_id == "a" else "a"
    ports = {home_id: free_port(), other_id: free_port()}
    gws: dict[str, Any] = {}
    for me, peer in ((home_id, other_id), (other_id, home_id)):
        d = work / me
        d.mkdir()
        base = free_port_block(2)
        cfg = write_config(
            d, voice_url=f"{app_obj.base_url}/voice", app_secret=app_obj.secret,
            events_url=None, api_port=ports[me],
            workers=f"count = 2\ncalls_per_worker = 2\nreserved_slots = 0\n"
                    f"sip_port_start = {base}",
            kamailio='mode = "managed"\nping_interval_s = 1\n',
            extra=f'[cluster]\nnode_id = "{me}"\npeers = ["http://127.0.0.1:{ports[peer]}"]\n'
                  f'token = "{CLUSTER_TOKEN}"\nping_interval_s = 0.5\ndead_after_s = 2\n')
        gws[me] = start_gateway(cfg, d, timeout=60)
    home, other = gws[home_id], gws[other_id]
    farms: list[PhoneFarm] = []
    n = 8
    out: dict[str, Any] = {"nodes": 2, "workers_per_node": 2, "per_worker": 2,
                           "participants": n, "home_node": home_id}
    try:
        await _cluster_live(home.api_port, other.api_port)
        farms = list(await asyncio.gather(*(PhoneFarm(work, name=f"farm{i}").start()
                                            for i in range(-(-n // PER_FARM)))))
        calls: dict[int, tuple[PhoneFarm, str]] = {}
        for i in range(n):
            hz = tone_for(i)
            gw = home if i < n // 2 else other
            farm = farms[i // PER_FARM]
            cid = await farm.call(f"sip:{NUMBER}@127.0.0.1:{gw.sip_port}", hz,
                                  from_user=f"+2547110{i:05d}")
            calls[hz] = (farm, cid)
            await farm.wait(cid, "answered", 15)
            await _until_count(home.api_port, i + 1)  # in order: each node's first is its hub
        room = await _until_count(home.api_port, n)
        by_call = {r["form"]["callId"]: int(r["form"]["from"][-5:])
                   for r in app_obj.requests if "callId" in r["form"]}
        parts = sorted(({**p, "hz": tone_for(by_call[p["call_id"]])}
                        for p in room["participants"]), key=lambda p: p["joined_at"])
        pids = {f"{me}/{w}": pid for me, gw in gws.items() for w, pid in worker_pids(gw).items()}
        cpu0 = _cpu(pids)  # type: ignore[arg-type]
        t_cpu0 = time.monotonic()

        t0 = time.time()
        await asyncio.sleep(2.0)
        t1 = time.time()
        await asyncio.sleep(0.4)
        all_hz = [p["hz"] for p in parts]
        quietest, loudest, wrong = 0.0, -200.0, {}
        for p in parts:
            farm, cid = calls[p["hz"]]
            x, rate = farm.recording(cid)
            lv = tones.levels(x, rate, all_hz, farm.offset(cid, t0) + 0.5, farm.offset(cid, t1))
            quietest = min(quietest, min(db for f, db in lv.items() if f != p["hz"]))
            loudest = max(loudest, lv[p["hz"]])
            got = {f for f, db in lv.items() if db > args.heard_dbfs}
            if got != set(all_hz) - {p["hz"]}:
                wrong[p["hz"]] = sorted(got ^ (set(all_hz) - {p["hz"]}))
        out["hear_matrix_ok"] = not wrong
        out["hear_matrix_wrong"] = wrong
        out["quietest_expected_dbfs"] = round(quietest, 1)
        out["loudest_own_tone_dbfs"] = round(loudest, 1)

        # each node's hub: the worker of its first member; the leaves hold the other two
        def leaf(node: str) -> list[dict[str, Any]]:
            mine = [p for p in parts if p["node"] == node]
            hub = mine[0]["worker"]
            return [p for p in mine if p["worker"] != hub]

        far, near = leaf(home_id), leaf(other_id)
        if len(far) < 2 or len(near) < 2 or len({p["worker"] for p in far}) != 1 \
                or len({p["worker"] for p in near}) != 1:
            raise SystemExit(f"placement does not allow the measurement: {parts}")
        s, r = near[0], near[1]
        s2, f = far[0], far[1]
        out["latency_roles"] = {"S,R": [other_id, s["worker"]], "S2,F": [home_id, s2["worker"]]}
        for p in parts:
            await _mute(home.api_port, p["call_id"], True)
        await asyncio.sleep(0.8)
        added, d1s, d2s = [], [], []
        for _ in range(args.cycles):
            on1 = await _step(home.api_port, s, calls, [r, f])
            on2 = await _step(home.api_port, s2, calls, [r, f])
            if None in on1.values() or None in on2.values():
                continue
            d1 = on1[f["hz"]] - on1[r["hz"]]  # type: ignore[operator]
            d2 = on2[f["hz"]] - on2[r["hz"]]  # type: ignore[operator]
            d1s.append(d1 * 1000)
            d2s.append(d2 * 1000)
            added.append((d1 - d2) / 2 * 1000)
        out["latency"] = {
            "cycles": len(added),
            "three_hops_added_ms": [round(v, 1) for v in added],
            "three_hops_added_ms_median": round(statistics.median(added), 1) if added else None,
            "d1_ms": [round(v, 1) for v in d1s],
            "d2_ms": [round(v, 1) for v in d2s],
        }
        seconds = time.monotonic() - t_cpu0
        cpu1 = _cpu(pids)  # type: ignore[arg-type]
        out["worker_cpu_pct"] = {w: round(100 * (cpu1.get(w, 0) - cpu0.get(w, 0)) / seconds, 1)
                                 for w in sorted(cpu0)}
    finally:
        await asyncio.gather(*(fm.stop() for fm in farms), return_exceptions=True)
        for gw in gws.values():
            gw.stop()
        await runner.cleanup()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            out["work_dir"] = str(work)
    print(json.dumps(out, indent=1))


async def _cluster_live(*ports: int) -> None:
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            live = []
            for port in ports:
                async with http.get(f"http://127.0.0.1:{port}/cluster/v1/ping", headers={
                        "Authorization": f"Bearer {CLUSTER_TOKEN}"}) as r:
                    live.append(bool((await r.json()).get("live")))
            if all(live):
                return
            await asyncio.sleep(0.2)
    raise SystemExit("the two nodes did not see each other")


async def _until_count(port: int, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        room = (await api(port, "GET", "/v1/conferences/bench")).get("conference", {})
        if room.get("participant_count") == count:
            return dict(room)
        await asyncio.sleep(0.1)
    raise SystemExit(f"the room never had {count} participants")


async def _mute(port: int, call_id: str, muted: bool) -> None:
    await api(port, "POST", f"/v1/conferences/bench/participants/{call_id}", {"muted": muted})


async def _step(port: int, speaker: dict[str, Any], calls: dict[int, tuple[PhoneFarm, str]],
                listeners: list[dict[str, Any]]) -> dict[int, float | None]:
    """Unmute `speaker` for 0.8 s; the wall-clock onset of its tone at each listener."""
    t = time.time()
    await _mute(port, speaker["call_id"], False)
    await asyncio.sleep(0.8)
    await _mute(port, speaker["call_id"], True)
    await asyncio.sleep(0.8)
    onsets: dict[int, float | None] = {}
    for lst in listeners:
        farm, cid = calls[lst["hz"]]
        x, rate = farm.recording(cid)
        media = farm.of(cid, "media")
        assert media is not None
        at = tones.onset(x, rate, speaker["hz"], after_s=farm.offset(cid, t))
        onsets[lst["hz"]] = None if at is None else float(media["t0"]) + at
    return onsets


def _cpu(pids: dict[int, int]) -> dict[int, float]:
    import psutil

    out: dict[int, float] = {}
    for w, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[w] = t.user + t.system
    return out


if __name__ == "__main__":
    asyncio.run(main())
