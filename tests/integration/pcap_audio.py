"""RTP audio in pcap files, for SIPp's `play_pcap_audio`: read, decode, write. Pure python/numpy.

Reading: libpcap files (either byte order, micro- or nanosecond timestamps) with the link types
SIPp's and tcpdump's captures use: Ethernet (with 802.1Q tags), Linux cooked (SLL and SLL2), raw
IP and BSD loopback. IPv4 (with options) and IPv6 (no extension headers), UDP, RTP version 2.

Writing: IPv4/UDP in Ethernet frames, like SIPp's own `g711a.pcap`: one RTP packet per `ptime`
(20 ms by default), sequence numbers and timestamps counting up from random starts, the marker
on the first packet, one SSRC, pcap timestamps spaced by `ptime` (SIPp paces the packets by
them). SIPp rewrites the UDP ports and addresses when it plays the file and keeps the RTP
header and payload as they are.

Samples are float32 mono in [-1, 1] at 8 kHz, scaled like 16-bit PCM / 32768 (what PJSIP's
G.711 decoder and `media.audio.read_wav` give for the same code words).

Also here: in-band DTMF test signals, and the comparisons of a recording with the audio that
was sent (alignment by cross-correlation, per block to follow jitter-buffer slips; which sent
frames the recording reproduces; whether a template such as the beep occurs in it).
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

Samples = NDArray[np.float32]
Law = Literal["PCMA", "PCMU"]

RATE = 8000
PT_PCMU = 0
PT_PCMA = 8
LAW_OF_PT: dict[int, Law] = {PT_PCMU: "PCMU", PT_PCMA: "PCMA"}
PT_OF_LAW: dict[Law, int] = {"PCMU": PT_PCMU, "PCMA": PT_PCMA}

# libpcap link types.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLAN = (0x8100, 0x88A8, 0x9100)
_IPPROTO_UDP = 17


# -- G.711 ------------------------------------------------------------------------------------
def _alaw_table() -> NDArray[np.int16]:
    """A-law code word → 16-bit linear (ITU-T G.711 reconstruction levels, scaled by 8)."""
    out = np.empty(256, dtype=np.int16)
    for code in range(256):
        v = code ^ 0x55
        seg = (v >> 4) & 7
        mant = v & 0x0F
        mag = (mant << 4) + 8 if seg == 0 else ((mant << 4) + 0x108) << (seg - 1)
        out[code] = mag if v & 0x80 else -mag
    return out


def _ulaw_table() -> NDArray[np.int16]:
    """μ-law code word → 16-bit linear (ITU-T G.711, the usual 14-bit values scaled by 4)."""
    out = np.empty(256, dtype=np.int16)
    for code in range(256):
        v = ~code & 0xFF
        seg = (v >> 4) & 7
        mant = v & 0x0F
        mag = (((mant << 3) + 0x84) << seg) - 0x84
        out[code] = -mag if v & 0x80 else mag
    return out


ALAW_TO_LINEAR = _alaw_table()
ULAW_TO_LINEAR = _ulaw_table()
_TABLES = {"PCMA": ALAW_TO_LINEAR, "PCMU": ULAW_TO_LINEAR}
ALAW_SILENCE = 0xD5  # +8: A-law has no zero level
ULAW_SILENCE = 0xFF


def _table(law: Law) -> NDArray[np.int16]:
    try:
        return _TABLES[law]
    except KeyError:
        raise ValueError(f"unknown G.711 law {law!r} (PCMA or PCMU)") from None


def g711_decode(payload: bytes, law: Law = "PCMA") -> Samples:
    """G.711 code words → float samples (16-bit linear / 32768)."""
    codes = np.frombuffer(payload, dtype=np.uint8)
    return (_table(law)[codes].astype(np.float32) / 32768.0).astype(np.float32)


def g711_encode(x: NDArray[np.floating], law: Law = "PCMA") -> bytes:
    """Float samples → G.711 code words, each sample to its nearest reconstruction level.

    G.711's decision thresholds lie halfway between its reconstruction levels, so this is the
    standard's quantiser; decoding gives back the level exactly. (The common C encoder, Sun's
    g711.c that PJSIP also uses, truncates negative inputs to 13 bits first and so may pick the
    next level for a negative sample within 8/32768 of a threshold.)
    """
    table = _table(law).astype(np.float64)
    order = np.argsort(table, kind="stable")
    # μ-law has two code words for 0: keep the later, 0xFF (+0), as encoders do.
    keep = np.append(table[order][1:] != table[order][:-1], True)
    order = order[keep]
    levels = table[order]
    y = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), -1.0, 1.0) * 32768.0
    i = np.clip(np.searchsorted(levels, y), 1, levels.size - 1)
    below, above = y - levels[i - 1], levels[i] - y
    # A tie goes to the smaller magnitude (A-law's 0 to +8, 0xD5), as encoders' truncation does.
    lower_wins = (below < above) | ((below == above) & (np.abs(levels[i - 1]) < levels[i]))
    nearest = np.where(lower_wins, i - 1, i)
    return bytes(order[nearest].astype(np.uint8).tobytes())


# -- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RtpPacket:
    time: float  # capture time, seconds since the epoch
    src: tuple[str, int]
    dst: tuple[str, int]
    pt: int
    marker: bool
    seq: int
    timestamp: int
    ssrc: int
    payload: bytes


def read_pcap(path: Path | str) -> tuple[int, list[tuple[float, bytes]]]:
    """The link type and (capture time, frame bytes) of every packet of a libpcap file."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file (too short)")
    try:
        endian, unit = _MAGIC[data[:4]]
    except KeyError:
        raise ValueError(f"{path}: not a libpcap file (magic {data[:4].hex()}; pcapng?)") from None
    _, _, _, _, _, linktype = struct.unpack(endian + "HHiIII", data[4:24])
    linktype &= 0x0FFFFFFF  # the top bits may carry FCS information
    frames: list[tuple[float, bytes]] = []
    off = 24
    while off + 16 <= len(data):
        sec, frac, caplen, _origlen = struct.unpack(endian + "IIII", data[off : off + 16])
        off += 16
        if off + caplen > len(data):
            raise ValueError(f"{path}: truncated packet at byte {off}")
        frames.append((sec + frac * unit, data[off : off + caplen]))
        off += caplen
    return linktype, frames


def _ip_of_frame(linktype: int, frame: bytes) -> bytes | None:
    """The IP packet inside a link-layer frame, or None if it carries something else."""
    if linktype == LINKTYPE_ETHERNET:
        off, etype = 14, struct.unpack("!H", frame[12:14])[0] if len(frame) >= 14 else -1
        while etype in _ETHERTYPE_VLAN and len(frame) >= off + 4:
            etype = struct.unpack("!H", frame[off + 2 : off + 4])[0]
            off += 4
    elif linktype == LINKTYPE_LINUX_SLL:
        off, etype = 16, struct.unpack("!H", frame[14:16])[0] if len(frame) >= 16 else -1
    elif linktype == LINKTYPE_LINUX_SLL2:
        off, etype = 20, struct.unpack("!H", frame[0:2])[0] if len(frame) >= 20 else -1
    elif linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return frame
    elif linktype == LINKTYPE_NULL:
        return frame[4:]  # address family in host byte order; the IP version tells the rest
    else:
        raise ValueError(f"unsupported pcap link type {linktype}")
    if etype not in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6):
        return None
    return frame[off:]


def _udp_of_ip(ip: bytes) -> tuple[str, str, bytes] | None:
    """(source address, destination address, UDP datagram) of an IP packet, or None."""
    if not ip:
        return None
    version = ip[0] >> 4
    if version == 4 and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        frag = struct.unpack("!H", ip[6:8])[0]
        if ip[9] != _IPPROTO_UDP or frag & 0x1FFF:  # not UDP, or a later fragment
            return None
        src4, dst4 = ipaddress.IPv4Address(ip[12:16]), ipaddress.IPv4Address(ip[16:20])
        return str(src4), str(dst4), ip[ihl : total or len(ip)]
    if version == 6 and len(ip) >= 40:
        if ip[6] != _IPPROTO_UDP:
            return None
        plen = struct.unpack("!H", ip[4:6])[0]
        src6, dst6 = ipaddress.IPv6Address(ip[8:24]), ipaddress.IPv6Address(ip[24:40])
        return str(src6), str(dst6), ip[40 : 40 + plen]
    return None


def _rtp_of_udp(t: float, src_ip: str, dst_ip: str, udp: bytes) -> RtpPacket | None:
    if len(udp) < 8 + 12:
        return None
    sport, dport, ulen = struct.unpack("!HHH", udp[:6])
    body = udp[8 : ulen if ulen >= 8 else len(udp)]
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", body[:12])
    if b0 >> 6 != 2:
        return None
    start = 12 + 4 * (b0 & 0x0F)  # CSRCs
    if b0 & 0x10:  # header extension
        if len(body) < start + 4:
            return None
        start += 4 + 4 * struct.unpack("!H", body[start + 2 : start + 4])[0]
    end = len(body)
    if b0 & 0x20 and end > start:  # padding: the last byte counts it
        end -= body[-1]
    if end < start:
        return None
    return RtpPacket(
        time=t,
        src=(src_ip, sport),
        dst=(dst_ip, dport),
        pt=b1 & 0x7F,
        marker=bool(b1 & 0x80),
        seq=seq,
        timestamp=ts,
        ssrc=ssrc,
        payload=body[start:end],
    )


def read_rtp(path: Path | str) -> list[RtpPacket]:
    """Every RTP (version 2) packet over UDP in a pcap file, in capture order."""
    linktype, frames = read_pcap(path)
    out: list[RtpPacket] = []
    for t, frame in frames:
        ip = _ip_of_frame(linktype, frame)
        udp = _udp_of_ip(ip) if ip is not None else None
        if udp is None:
            continue
        pkt = _rtp_of_udp(t, *udp)
        if pkt is not None:
            out.append(pkt)
    return out


def _unwrap(values: list[int], bits: int) -> list[int]:
    """Extend wrapping counters (RTP seq: 16 bits, timestamp: 32 bits) to monotonic-ish ints."""
    if not values:
        return []
    mod, half = 1 << bits, 1 << (bits - 1)
    out = [values[0]]
    for v in values[1:]:
        d = (v - out[-1]) % mod
        out.append(out[-1] + (d - mod if d >= half else d))
    return out


def rtp_stream(
    packets: list[RtpPacket], *, ssrc: int | None = None, pt: int | None = None
) -> list[RtpPacket]:
    """One stream's packets in sequence-number order, duplicates dropped.

    The stream is `ssrc` if given, else the SSRC with the most packets (of payload type `pt` if
    given). Only packets of that SSRC (and `pt`, if given) are returned.
    """
    pool = [p for p in packets if pt is None or p.pt == pt]
    if ssrc is None:
        if not pool:
            return []
        ssrc = Counter(p.ssrc for p in pool).most_common(1)[0][0]
    pool = [p for p in pool if p.ssrc == ssrc]
    ext = _unwrap([p.seq for p in pool], 16)
    by_seq: dict[int, RtpPacket] = {}
    for e, p in zip(ext, pool, strict=True):
        by_seq.setdefault(e, p)
    return [by_seq[k] for k in sorted(by_seq)]


def stream_audio(stream: list[RtpPacket], *, fill_gaps: bool = True) -> Samples:
    """Decode a G.711 stream (PCMA/PCMU, 8 kHz) to float samples.

    With `fill_gaps`, each payload is placed at its RTP timestamp, so lost packets and
    timestamp jumps become silence; otherwise the payloads are simply joined.
    """
    audio = [p for p in stream if p.pt in LAW_OF_PT]
    if not audio:
        return np.zeros(0, dtype=np.float32)
    if not fill_gaps:
        return np.concatenate([g711_decode(p.payload, LAW_OF_PT[p.pt]) for p in audio])
    ts = _unwrap([p.timestamp for p in audio], 32)
    base = ts[0]
    end = max(t - base + len(p.payload) for t, p in zip(ts, audio, strict=True))
    out = np.zeros(end, dtype=np.float32)
    for t, p in zip(ts, audio, strict=True):
        if t < base:
            continue  # a stray packet from before the stream's first timestamp
        x = g711_decode(p.payload, LAW_OF_PT[p.pt])
        out[t - base : t - base + x.size] = x
    return out


def pcap_audio(path: Path | str, *, ssrc: int | None = None) -> Samples:
    """The G.711 audio of one RTP stream of a pcap (the busiest PCMA/PCMU SSRC by default)."""
    packets = [p for p in read_rtp(path) if p.pt in LAW_OF_PT]
    return stream_audio(rtp_stream(packets, ssrc=ssrc))


# -- writing ----------------------------------------------------------------------------------
def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes, ident: int) -> bytes:
    sa, da = ipaddress.IPv4Address(src[0]).packed, ipaddress.IPv4Address(dst[0]).packed
    ulen = 8 + len(payload)
    pseudo = sa + da + struct.pack("!BBH", 0, _IPPROTO_UDP, ulen)
    udp_nosum = struct.pack("!HHHH", src[1], dst[1], ulen, 0) + payload
    usum = _checksum(pseudo + udp_nosum) or 0xFFFF
    udp = struct.pack("!HHHH", src[1], dst[1], ulen, usum) + payload
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0xB8, 20 + ulen, ident & 0xFFFF, 0x4000, 64, _IPPROTO_UDP, 0, sa, da
    )  # DSCP EF, don't fragment
    hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
    return hdr + udp


def rtp_packet(
    pt: int, seq: int, timestamp: int, ssrc: int, payload: bytes, *, marker: bool = False
) -> bytes:
    """An RTP version 2 packet without CSRCs or extension."""
    return (
        struct.pack(
            "!BBHII",
            0x80,
            (0x80 if marker else 0) | (pt & 0x7F),
            seq & 0xFFFF,
            timestamp & 0xFFFFFFFF,
            ssrc & 0xFFFFFFFF,
        )
        + payload
    )


def write_pcap(
    path: Path | str, packets: list[tuple[float, bytes]], linktype: int = LINKTYPE_ETHERNET
) -> None:
    """Write (capture time, link-layer frame) pairs as a little-endian microsecond libpcap file
    (SIPp plays Ethernet and Linux cooked captures)."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)]
    for t, frame in packets:
        sec = int(t)
        usec = round((t - sec) * 1e6)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        out.append(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
        out.append(frame)
    Path(path).write_bytes(b"".join(out))


def write_rtp_pcap(
    path: Path | str,
    samples: NDArray[np.floating],
    *,
    law: Law = "PCMA",
    ptime_ms: int = 20,
    ssrc: int | None = None,
    first_seq: int | None = None,
    first_timestamp: int | None = None,
    src: tuple[str, int] = ("10.0.0.1", 40000),
    dst: tuple[str, int] = ("10.0.0.2", 50000),
    start_time: float = 1_700_000_000.0,
) -> int:
    """Write float samples (8 kHz) as one G.711 RTP stream in an Ethernet pcap; returns its SSRC.

    The last packet is padded with silence to a whole `ptime`. Random SSRC, first sequence
    number and first timestamp unless given (RFC 3550 asks for random starts).
    """
    if ptime_ms <= 0 or RATE * ptime_ms % 1000:
        raise ValueError(f"ptime {ptime_ms} ms is not a whole number of 8 kHz samples")
    per = RATE * ptime_ms // 1000
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    n_packets = max(1, -(-x.size // per))
    codes = g711_encode(x, law)
    pad = bytes([ALAW_SILENCE if law == "PCMA" else ULAW_SILENCE]) * (n_packets * per - x.size)
    codes += pad
    ssrc = secrets.randbits(32) if ssrc is None else ssrc
    seq = secrets.randbits(15) if first_seq is None else first_seq  # room before it wraps
    ts = secrets.randbits(31) if first_timestamp is None else first_timestamp
    pt = PT_OF_LAW[law]
    eth = bytes.fromhex("020000000002020000000001") + struct.pack("!H", _ETHERTYPE_IPV4)
    frames: list[tuple[float, bytes]] = []
    for i in range(n_packets):
        rtp = rtp_packet(
            pt, seq + i, ts + i * per, ssrc, codes[i * per : (i + 1) * per], marker=i == 0
        )
        frames.append((start_time + i * ptime_ms / 1000.0, eth + _ipv4_udp(src, dst, rtp, i)))
    write_pcap(path, frames)
    return ssrc


# -- test signals -----------------------------------------------------------------------------
DTMF_FREQS: dict[str, tuple[float, float]] = {
    d: (lo, hi)
    for row, lo in zip(("123A", "456B", "789C", "*0#D"), (697.0, 770.0, 852.0, 941.0), strict=True)
    for d, hi in zip(row, (1209.0, 1336.0, 1477.0, 1633.0), strict=True)
}
# G.711: a full-scale sine is +3.14 dBm0 (A-law's 16-bit peak is 32256; the same reference
# the in-band detector uses), so 0 dBm0 is this amplitude in float samples.
DBM0_AMPLITUDE = 10.0 ** (-3.14 / 20.0)


def dtmf_sequence(
    digits: str,
    *,
    tone_ms: float = 60.0,
    gap_ms: float = 100.0,
    lead_s: float = 1.5,
    tail_s: float = 0.5,
    level_dbm0: float = -10.0,
    rate: int = RATE,
) -> Samples:
    """In-band DTMF: `lead_s` of silence, then each digit's two tones (`level_dbm0` each) for
    `tone_ms`, `gap_ms` of silence between digits, `tail_s` of silence at the end."""
    amp = DBM0_AMPLITUDE * 10.0 ** (level_dbm0 / 20.0)
    n_tone = round(rate * tone_ms / 1000.0)
    t = np.arange(n_tone) / rate
    parts = [np.zeros(round(rate * lead_s))]
    for i, d in enumerate(digits):
        lo, hi = DTMF_FREQS[d]
        if i:
            parts.append(np.zeros(round(rate * gap_ms / 1000.0)))
        parts.append(amp * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t)))
    parts.append(np.zeros(round(rate * tail_s)))
    return np.concatenate(parts).astype(np.float32)


# -- comparing a recording with what was sent -------------------------------------------------
FRAME = 160  # 20 ms at 8 kHz


def frame_dbfs(x: NDArray[np.floating], frame: int = FRAME, offset: int = 0) -> NDArray[np.float64]:
    """RMS level (dBFS, full-scale square = 0) of each whole frame from sample `offset` on;
    -inf for digital zero."""
    y = np.asarray(x, dtype=np.float64).reshape(-1)[offset:]
    n = y.size // frame
    ms = np.mean(y[: n * frame].reshape(n, frame) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        levels: NDArray[np.float64] = 10.0 * np.log10(ms)
    return levels


def sound_span(
    x: NDArray[np.floating], *, threshold_dbfs: float = -50.0, frame: int = FRAME, offset: int = 0
) -> tuple[int, int] | None:
    """(first sample, end sample) of the frames from the first to the last one whose level
    reaches `threshold_dbfs`, frames counted from sample `offset` (pass the alignment lag
    modulo `frame` to cut a recording's frames where the sent audio's were); None if no frame
    does. A-law's idle code (-72 dBFS) is below the default threshold."""
    offset %= frame
    loud = np.flatnonzero(frame_dbfs(x, frame, offset) >= threshold_dbfs)
    if loud.size == 0:
        return None
    return offset + int(loud[0]) * frame, offset + (int(loud[-1]) + 1) * frame


def _xcorr(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """c[k] = sum_n a[n + k] * b[n] for k = -(len(b) - 1) .. len(a) - 1, via FFT."""
    n = a.size + b.size - 1
    size = 1 << (n - 1).bit_length()
    c = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    return np.concatenate([c[size - (b.size - 1) :], c[: a.size]])


def align(recorded: NDArray[np.floating], sent: NDArray[np.floating]) -> tuple[int, float]:
    """The lag (samples) at which `sent` best lines up inside `recorded` (sent[n] ~
    recorded[n + lag]) and the correlation coefficient of the overlapping parts there."""
    r = np.asarray(recorded, dtype=np.float64).reshape(-1)
    s = np.asarray(sent, dtype=np.float64).reshape(-1)
    if r.size == 0 or s.size == 0:
        return 0, 0.0
    c = _xcorr(r, s)
    lag = int(np.argmax(c)) - (s.size - 1)
    lo, hi = max(0, -lag), min(s.size, r.size - lag)  # overlap, in sent's samples
    a, b = r[lo + lag : hi + lag], s[lo:hi]
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    return lag, (float(np.dot(a, b)) / denom if denom > 0 else 0.0)


@dataclass(frozen=True)
class Block:
    """One stretch of the sent audio and where it sits in the recording."""

    start: int  # sent samples [start, end)
    end: int
    lag: int  # sent[n] ~ recorded[n + lag] in this block
    coeff: float  # normalised correlation there; nan: no sound, or not in the recording
    dot: float = 0.0  # the parts of `coeff`, to pool blocks
    sent_energy: float = 0.0
    recorded_energy: float = 0.0


def align_blocks(
    recorded: NDArray[np.floating],
    sent: NDArray[np.floating],
    lag: int,
    *,
    block: int = 4000,
    search: int = 400,
    threshold_dbfs: float = -50.0,
) -> list[Block]:
    """Align each `block` of the sent audio on its own, within `search` samples of `lag`.

    A receiver's adaptive jitter buffer may insert or drop a few ms (PJSIP: 10 ms steps, under
    load), which shifts everything after it: one lag for the whole recording then misses
    part of it, block lags do not. Blocks without sound keep the previous block's lag.
    """
    r = np.asarray(recorded, dtype=np.float64).reshape(-1)
    s = np.asarray(sent, dtype=np.float64).reshape(-1)
    out: list[Block] = []
    cur = lag
    for b in range(0, s.size, block):
        e = min(b + block, s.size)
        # The part of the block whose every candidate position lies inside the recording.
        b2, e2 = max(b, search - lag), min(e, r.size - lag - search)
        seg = s[b2:e2] if e2 - b2 >= FRAME else s[:0]
        if seg.size == 0 or frame_dbfs(seg).max(initial=-np.inf) < threshold_dbfs:
            out.append(Block(b, e, cur, float("nan")))  # no sound, or not recorded
            continue
        win = r[b2 + lag - search : e2 + lag + search]
        num = _xcorr(win, seg)[seg.size - 1 : seg.size + 2 * search]  # offsets 0 .. 2*search
        csum = np.concatenate([[0.0], np.cumsum(win * win)])
        e_win = csum[seg.size : seg.size + 2 * search + 1] - csum[: 2 * search + 1]
        e_seg = float(np.dot(seg, seg))
        ncc = num / np.sqrt(np.maximum(e_win, 1e-12) * e_seg)
        k = int(np.argmax(ncc))
        cur = lag + k - search
        out.append(Block(b, e, cur, float(ncc[k]), float(num[k]), e_seg, float(e_win[k])))
    return out


def pooled_correlation(blocks: list[Block]) -> float:
    """Correlation of the recording with the sent audio over all blocks, each at its lag."""
    dot = sum(b.dot for b in blocks)
    energy = sum(b.sent_energy for b in blocks) * sum(b.recorded_energy for b in blocks)
    return dot / float(np.sqrt(energy)) if energy > 0 else 0.0


@dataclass(frozen=True)
class Carried:
    """How much of the sent audio a recording carries."""

    first: int  # sent sample where the first carried frame starts (-1: none)
    end: int  # sent sample where the last carried frame ends
    recorded_first: int  # the same two, in the recording
    recorded_end: int
    carried_frames: int  # sent frames with sound that the recording reproduces
    sound_frames: int  # sent frames with sound

    @property
    def seconds(self) -> float:
        """Length of the sent audio from the first to the last carried frame."""
        return max(0, self.end - self.first) / RATE

    @property
    def recorded_seconds(self) -> float:
        """Length of the recording that carries it (from that first to that last frame)."""
        return max(0, self.recorded_end - self.recorded_first) / RATE

    @property
    def fraction(self) -> float:
        return self.carried_frames / self.sound_frames if self.sound_frames else 0.0


def carried(
    recorded: NDArray[np.floating],
    sent: NDArray[np.floating],
    lag: int | list[Block],
    *,
    threshold_dbfs: float = -50.0,
    max_error_db: float = -10.0,
    frame: int = FRAME,
) -> Carried:
    """Which of the sent frames with sound (level >= `threshold_dbfs`) the recording
    reproduces: at `lag` (or, given `align_blocks`' blocks, at the lag of the frame's block or
    a neighbour's) the recording's frame differs from the sent one by at most `max_error_db`
    relative to the sent frame's energy. Silence and made-up audio (packet loss concealment,
    a beep) never count; a frame cut off by the recording's ends does not either.
    """
    r = np.asarray(recorded, dtype=np.float64).reshape(-1)
    s = np.asarray(sent, dtype=np.float64).reshape(-1)
    n = s.size // frame
    first = end = rec_first = rec_end = -1
    hits = sound = 0
    limit = 10.0 ** (max_error_db / 10.0)
    floor = 10.0 ** (threshold_dbfs / 10.0)
    for i in range(n):
        seg = s[i * frame : (i + 1) * frame]
        energy = float(np.mean(seg * seg))
        if energy < floor:
            continue
        sound += 1
        for lg in _candidate_lags(lag, i * frame):
            a = i * frame + lg
            if a < 0 or a + frame > r.size:
                continue
            if float(np.mean((r[a : a + frame] - seg) ** 2)) <= limit * energy:
                hits += 1
                if first < 0:
                    first, rec_first = i * frame, a
                end, rec_end = (i + 1) * frame, a + frame
                break
    return Carried(first, end, rec_first, rec_end, hits, sound)


def _candidate_lags(lag: int | list[Block], at: int) -> list[int]:
    if isinstance(lag, int):
        return [lag]
    for j, blk in enumerate(lag):
        if blk.start <= at < blk.end:
            near = [blk.lag] + [lag[k].lag for k in (j - 1, j + 1) if 0 <= k < len(lag)]
            return list(dict.fromkeys(near))
    return [lag[-1].lag] if lag else []


def best_match(x: NDArray[np.floating], template: NDArray[np.floating]) -> float:
    """Highest normalised correlation of `template` with any same-length stretch of `x`
    (1.0: `x` contains it, at any level). Stretches quieter than -60 dBFS count as that level,
    so silence never matches."""
    y = np.asarray(x, dtype=np.float64).reshape(-1)
    t = np.asarray(template, dtype=np.float64).reshape(-1)
    if y.size < t.size or t.size == 0:
        return 0.0
    num = _xcorr(y, t)[t.size - 1 : y.size]  # k = 0 .. len(y) - len(t)
    csum = np.concatenate([[0.0], np.cumsum(y * y)])
    seg_energy = csum[t.size :] - csum[: y.size - t.size + 1]
    floor = t.size * 10.0 ** (-60.0 / 10.0)
    denom = np.sqrt(np.maximum(seg_energy, floor) * float(np.dot(t, t)))
    return float(np.max(np.abs(num) / denom))
