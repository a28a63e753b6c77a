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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

_STAMP = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$")


@dataclass
class CallTrace:
    call_id: str
    at: dict[str, float] = field(default_factory=dict)  # kind -> first stamp (epoch s)
    codes: list[str] = field(default_factory=list)  # final INVITE codes other than 200

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
                if sep and k.strip().lower() in ("call-id", "cseq", "i"):
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


def match_fifo(
    carrier: list[CallTrace], callee: list[CallTrace], window_s: float = 10.0
) -> list[tuple[CallTrace, CallTrace]]:
    """Pairs (carrier call, callee call): each callee INVITE, in arrival order, goes with the
    earliest unmatched carrier call whose INVITE left before it (within `window_s`). The
    legs carry no common header, so this is by order; exact while setups are shorter than the
    gap between calls, a close approximation under load (the median is what is reported)."""
    todo = sorted((c for c in carrier if ">INVITE" in c.at), key=lambda c: c.at[">INVITE"])
    out: list[tuple[CallTrace, CallTrace]] = []
    i = 0
    for b in sorted((c for c in callee if "<INVITE" in c.at), key=lambda c: c.at["<INVITE"]):
        t = b.at["<INVITE"]
        while i < len(todo) and todo[i].at[">INVITE"] < t - window_s:
            i += 1
        if i < len(todo) and todo[i].at[">INVITE"] <= t:
            out.append((todo[i], b))
            i += 1
    return out


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


class AudioSniffer:
    """RTP on `lo` from the system under test's RTP ports to the carrier's and the callee's
    SDP ports (AF_PACKET, needs root), each packet stamped and marked loud when more than a
    quarter of its PCMA bytes are not silence. For a few pairs only: Python reads every packet
    on loopback. Proves the bridge carries each side's audio to the other (the pcaps are
    speech; workers send RTP silence, VAD off, when nothing reaches a port)."""

    def __init__(self, src: range, to_caller: range, to_callee: range) -> None:
        self.src, self.to_caller, self.to_callee = src, to_caller, to_callee
        self.packets: list[tuple[float, str, bool]] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            sk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
            sk.bind(("lo", 0))
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
                    pkt = sk.recv(2048)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if pkt[12:14] != b"\x08\x00" or pkt[23] != 17:  # IPv4 UDP
                    continue
                u = 14 + (pkt[14] & 15) * 4
                sport, dport = struct.unpack("!HH", pkt[u : u + 4])
                body = pkt[u + 8 :]
                if sport not in self.src or len(body) < 40 or body[0] >> 6 != 2:
                    continue
                side = ("caller" if dport in self.to_caller
                        else "callee" if dport in self.to_callee else "")  # fmt: skip
                if side:
                    audio = body[12:]
                    loud = sum(b not in SILENT_ALAW for b in audio) > len(audio) // 4
                    self.packets.append((time.time(), side, loud))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def loud(self, side: str, windows: list[tuple[float, float]]) -> tuple[int, int]:
        """(loud packets, packets) towards `side` inside any of the (from, to) wall-clock
        windows, each packet counted once."""
        got = [loud for t, s, loud in self.packets
               if s == side and any(a <= t <= b for a, b in windows)]  # fmt: skip
        return sum(got), len(got)
