"""SIPp message traces of bench/bridges.py, read per call: the carrier's (UAC) and the callee's
(UAS) side of each bridged pair, and the spans between them.

A trace (`-trace_msg`, `<scenario>_<pid>_messages.log`) is cut into messages, each with its
wall-clock stamp (µs), whether SIPp sent or received it, its first line, Call-ID and CSeq. Per
Call-ID the first stamp of each message kind is kept: `>INVITE` (sent), `<200 INVITE` (a
received 200 to the INVITE), `<ACK`, `>BYE`, ... plus the non-1xx, non-200 final codes of the
INVITE (refusals, as the carrier saw them).
"""

from __future__ import annotations

import math
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

_STAMP = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$")


@dataclass
class CallTrace:
    call_id: str
    at: dict[str, float] = field(default_factory=dict)  # kind -> first stamp (epoch s)
    codes: list[str] = field(default_factory=list)  # final INVITE codes other than 200
    parent: str = ""  # the caller leg's Call-ID, when the INVITE names it (X-Bench-Parent)

    def span_ms(self, a: str, b: str) -> float | None:
        if a in self.at and b in self.at:
            return (self.at[b] - self.at[a]) * 1000
        return None


def read_trace(work: Path, scenario: str) -> dict[str, CallTrace]:
    """Every call in `work`'s `<scenario>_*_messages.log` files, by Call-ID."""
    calls: dict[str, CallTrace] = {}
    for path in sorted(work.glob(f"{scenario}_*_messages.log")):
        text = path.read_text(errors="replace")
        for block in re.split(r"(?m)^(?=-{20,} \d{4}-)", text):
            lines = [ln.rstrip("\r") for ln in block.splitlines()]
            if len(lines) < 4 or not (m := _STAMP.match(lines[0])):
                continue
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            first = next((ln for ln in lines[2:] if ln.strip()), "").strip()
            hdr: dict[str, str] = {}
            for ln in lines[2:]:
                k, sep, v = ln.partition(":")
                if sep and k.strip().lower() in ("call-id", "cseq", "i", "x-bench-parent"):
                    hdr.setdefault("call-id" if k.strip().lower() == "i" else k.strip().lower(),
                                   v.strip())  # fmt: skip
            cid = hdr.get("call-id")
            if not cid or not first:
                continue
            sent = "message sent" in lines[1]
            method = hdr.get("cseq", "").split()[-1:] or [""]
            if first.startswith("SIP/2.0 "):
                code = first.split()[1]
                kind = f"{code} {method[0]}"
                if method[0] == "INVITE" and not sent and code[0] != "1" and code != "200":
                    call = calls.setdefault(cid, CallTrace(cid))
                    if code not in call.codes:
                        call.codes.append(code)
            else:
                kind = first.split()[0]
            call = calls.setdefault(cid, CallTrace(cid))
            call.at.setdefault(("<" if not sent else ">") + kind, at)
            if kind == "INVITE" and hdr.get("x-bench-parent"):
                call.parent = hdr["x-bench-parent"]
    return calls


def read_stat(path: Path) -> dict[str, str]:
    """The last row of a SIPp `-trace_stat` CSV ({} if none)."""
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    head = lines[0].split(";")
    return dict(zip(head, lines[-1].split(";"), strict=False))


def stat_int(row: dict[str, str], key: str) -> int:
    try:
        return int(row.get(key, "0") or 0)
    except ValueError:
        return 0


def failure_kinds(row: dict[str, str]) -> list[str]:
    """SIPp's own failure counters that are not zero (`FailedCallRejected=2`, ...)."""
    out = []
    for k, v in row.items():
        if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)":
            if v not in ("", "0"):
                out.append(f"{k[:-3]}={v}")
    return out


def match_legs(
    carrier: list[CallTrace],
    callee: list[CallTrace],
    parent_of: dict[str, str] | None = None,
    window_s: float = 10.0,
) -> tuple[list[tuple[CallTrace, CallTrace]], int]:
    """Pairs (carrier call, callee call) and how many were matched exactly. Exactly: the
    callee's INVITE names its caller's Call-ID (the bare workers' X-Bench-Parent header), or
    `parent_of` maps the callee's Call-ID to the carrier's (the node's call records). Else by
    time: the latest unmatched carrier INVITE that left before the callee's INVITE (within
    `window_s`), right while the bridge dials faster than calls arrive."""
    by_id = {c.call_id: c for c in carrier if ">INVITE" in c.at}
    parent_of = parent_of or {}
    out: list[tuple[CallTrace, CallTrace]] = []
    used: set[str] = set()
    rest = []
    for b in sorted((c for c in callee if "<INVITE" in c.at), key=lambda c: c.at["<INVITE"]):
        a = by_id.get(b.parent or parent_of.get(b.call_id, ""))
        if a is not None and a.call_id not in used:
            used.add(a.call_id)
            out.append((a, b))
        else:
            rest.append(b)
    exact = len(out)
    todo = sorted((c for c in by_id.values() if c.call_id not in used),
                  key=lambda c: c.at[">INVITE"])  # fmt: skip
    for b in rest:
        t = b.at["<INVITE"]
        for a in reversed(todo):
            sent = a.at[">INVITE"]
            if a.call_id not in used and t - window_s <= sent <= t:
                used.add(a.call_id)
                out.append((a, b))
                break
    return out, exact


def peak_concurrency(spans: list[tuple[float, float]]) -> int:
    marks = [(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans]
    peak = cur = 0
    for _, d in sorted(marks):
        cur += d
        peak = max(peak, cur)
    return peak


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (nan when empty)."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else math.nan


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99),
            "max": max(xs) if xs else math.nan}  # fmt: skip


def fmt_summary(s: dict[str, float]) -> str:
    if not s.get("n"):
        return "no samples"
    return (f"p50 {s['p50']:.1f} / p90 {s['p90']:.1f} / p99 {s['p99']:.1f} / max {s['max']:.1f}"
            f" ms (n={int(s['n'])})")  # fmt: skip


# ------------------------------------------------------------------------ audio on the wire

SILENT_ALAW = frozenset((0xD5, 0x55, 0xD4, 0x54))  # PCMA bytes of (near) zero samples
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not name it
KEY = 16  # bytes of PCMA matched between a packet in and a packet out (2 ms of audio)


@dataclass
class Rtp:
    t: float  # kernel stamp (wall clock)
    sport: int
    dport: int
    audio: bytes  # the payload after the 12-byte RTP header
    ssrc: int = 0


class AudioSniffer:
    """RTP on `lo` to and from the system under test's RTP ports (AF_PACKET, needs root; kernel
    time stamps). For a few pairs only: Python reads every packet on loopback.

    - `loud`: packets out towards the caller's / the callee's SDP ports whose PCMA is mostly
      not silence: the bridge carries each side's speech to the other (the pcaps are speech;
      a worker sends RTP silence, VAD off, when nothing reaches a port).
    - `latency`: one-way delay through the bridge: the same PCMA bytes arriving from one
      carrier and leaving towards the other (G.711 through pjmedia's bridge with one source is
      byte-exact: A-law decoded and encoded again). Both carriers play the same pcap, so a
      match is kept only between two different ports of the system under test and, per port
      out, only the port in that matches it most (the leg it is bridged to)."""

    def __init__(self, sut: range, to_caller: range, to_callee: range) -> None:
        self.sut, self.to_caller, self.to_callee = sut, to_caller, to_callee
        self.out: list[Rtp] = []
        self.into: list[Rtp] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            sk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
            sk.bind(("lo", 0))
            sk.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sk.settimeout(0.2)
        except (OSError, AttributeError) as e:
            self.error = f"no audio check: {e}"
            return
        self._thread = threading.Thread(target=self._run, args=(sk,), daemon=True)
        self._thread.start()

    def _run(self, sk: socket.socket) -> None:
        with sk:
            while not self._stop.is_set():
                try:
                    pkt, anc, _, addr = sk.recvmsg(2048, socket.CMSG_SPACE(16))
                except TimeoutError:
                    continue
                except OSError:
                    return
                if addr[2] == socket.PACKET_OUTGOING:  # lo shows each packet twice
                    continue
                if pkt[12:14] != b"\x08\x00" or pkt[23] != 17:  # IPv4 UDP
                    continue
                u = 14 + (pkt[14] & 15) * 4
                sport, dport = struct.unpack("!HH", pkt[u : u + 4])
                body = pkt[u + 8 :]
                if len(body) < 40 or body[0] >> 6 != 2 or 200 <= body[1] <= 204:  # RTP, not RTCP
                    continue
                t = time.time()
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                        sec, nsec = struct.unpack("qq", data[:16])
                        t = sec + nsec / 1e9
                if sport in self.sut and (dport in self.to_caller or dport in self.to_callee):
                    ssrc = int.from_bytes(body[8:12], "big")
                    self.out.append(Rtp(t, sport, dport, body[12:], ssrc))
                elif dport in self.sut and (sport in self.to_caller or sport in self.to_callee):
                    self.into.append(Rtp(t, sport, dport, body[12:]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def loud(self, side: str, windows: list[tuple[float, float]]) -> tuple[int, int]:
        """(loud packets, packets) out towards `side` inside any of the (from, to) wall-clock
        windows, each packet counted once."""
        dst = self.to_caller if side == "caller" else self.to_callee
        got = [
            sum(b not in SILENT_ALAW for b in p.audio) > len(p.audio) // 4
            for p in self.out
            if p.dport in dst and any(a <= p.t <= b for a, b in windows)
        ]
        return sum(got), len(got)

    def latency(self) -> dict[str, list[float]]:
        """One-way ms through the bridge, 'caller -> callee' and 'callee -> caller'. Every
        pair plays the same pcap, so the same bytes come in on every caller leg's port,
        shifted by the gap between the calls' starts: each packet out is matched with the
        packet in that carried its bytes most recently (another pair's stream, started
        earlier, carried them earlier still), and per port out only the port in that most
        packets matched is kept (the leg it is bridged to). Per stream out, by its SSRC: a
        port is used again by a later call, bridged to another leg."""
        keys: dict[bytes, list[Rtp]] = {}
        for p in self.out:
            k = p.audio[:KEY]
            if len(k) == KEY and len(set(k)) >= 6:  # speech, not a silence pattern
                keys.setdefault(k, []).append(p)
        nearest: dict[int, tuple[float, int, str]] = {}  # id(packet out) -> (ms, port in, way)
        for q in self.into:
            way = "caller -> callee" if q.sport in self.to_caller else "callee -> caller"
            for i in range(len(q.audio) - KEY + 1):
                for p in keys.get(q.audio[i : i + KEY], ()):
                    towards = "callee" if p.dport in self.to_callee else "caller"
                    ms = (p.t - q.t) * 1e3
                    if p.sport != q.dport and 0 < ms < 1000 and way.endswith(towards):
                        if id(p) not in nearest or ms < nearest[id(p)][0]:
                            nearest[id(p)] = (ms, q.dport, way)
        stream = {id(p): (p.sport, p.ssrc) for p in self.out}
        votes: dict[tuple[int, int], Counter[int]] = {}
        for pid, (_, port_in, _) in nearest.items():
            votes.setdefault(stream[pid], Counter())[port_in] += 1
        peer = {s: c.most_common(1)[0][0] for s, c in votes.items()}
        out: dict[str, list[float]] = {"caller -> callee": [], "callee -> caller": []}
        for pid, (ms, port_in, way) in nearest.items():
            if peer[stream[pid]] == port_in:
                out[way].append(ms)
        return out
