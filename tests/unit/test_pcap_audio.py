"""tests/integration/pcap_audio.py: G.711, pcap reading/writing, and the recording comparisons."""

from __future__ import annotations

import random
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from media.audio import active_duration, beep, rms_dbfs
from media.dtmf_inband import InbandDtmfDetector
from tests.integration.pcap_audio import (
    ALAW_SILENCE,
    ALAW_TO_LINEAR,
    DBM0_AMPLITUDE,
    DTMF_FREQS,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_RAW,
    RATE,
    ULAW_TO_LINEAR,
    _checksum,
    align,
    align_blocks,
    best_match,
    carried,
    dtmf_sequence,
    g711_decode,
    g711_encode,
    pcap_audio,
    pooled_correlation,
    read_pcap,
    read_rtp,
    rtp_stream,
    sound_span,
    write_pcap,
    write_rtp_pcap,
)

SIPP_PCAPS = Path("/usr/share/sip-tester")
G711A = SIPP_PCAPS / "g711a.pcap"
needs_sipp_pcaps = pytest.mark.skipif(not G711A.exists(), reason="SIPp (sip-tester) not installed")


def test_g711_tables_known_values():
    # A-law: 0xD5 / 0x55 are the +-8 idle codes, 0xAA / 0x2A the extremes (+-32256).
    assert ALAW_TO_LINEAR[0xD5] == 8 and ALAW_TO_LINEAR[0x55] == -8
    assert ALAW_TO_LINEAR[0xAA] == 32256 and ALAW_TO_LINEAR[0x2A] == -32256
    # mu-law: 0xFF and 0x7F are zero, 0x80 / 0x00 the extremes (+-32124).
    assert ULAW_TO_LINEAR[0xFF] == 0 and ULAW_TO_LINEAR[0x7F] == 0
    assert ULAW_TO_LINEAR[0x80] == 32124 and ULAW_TO_LINEAR[0x00] == -32124
    assert len(set(ALAW_TO_LINEAR.tolist())) == 256  # every A-law code word its own level
    assert len(set(ULAW_TO_LINEAR.tolist())) == 255  # mu-law has +0 and -0


def test_g711_tables_match_the_reference_decoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # Sun's g711.c, gone in Python 3.13
    codes = bytes(range(256))
    assert (np.frombuffer(audioop.alaw2lin(codes, 2), "<i2") == ALAW_TO_LINEAR).all()
    assert (np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2") == ULAW_TO_LINEAR).all()


@pytest.mark.parametrize("law", ["PCMA", "PCMU"])
def test_g711_encode_is_nearest_level(law):
    codes = bytes(c for c in range(256) if not (law == "PCMU" and c == 0x7F))
    assert g711_encode(g711_decode(codes, law), law) == codes
    x = np.linspace(-1.0, 1.0, 200_001)
    y = g711_decode(g711_encode(x, law), law)
    table = np.sort((ALAW_TO_LINEAR if law == "PCMA" else ULAW_TO_LINEAR) / 32768.0)
    gaps = np.diff(np.unique(table))
    # No other level is closer (allowing for float32 rounding of the decoded value).
    nearest = table[np.abs(table[None, :] - x[::997, None]).argmin(axis=1)]
    assert np.allclose(y[::997], nearest, atol=1e-6)
    err = np.abs(y - x)
    assert err[np.abs(x) <= 0.98].max() <= gaps.max() / 2 + 1e-6
    if law == "PCMA":  # above segment 1, half a step is at most 1/32 of the value
        big = np.abs(x) > 256 / 32768
        assert (err[big] / np.abs(x[big])).max() <= 1 / 32
    assert g711_encode(np.array([0.0]), "PCMA") == bytes([ALAW_SILENCE])


def test_samples_round_trip_through_a_pcap(tmp_path):
    rng = np.random.default_rng(1)
    t = np.arange(round(1.234 * RATE)) / RATE
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    path = tmp_path / "rt.pcap"
    ssrc = write_rtp_pcap(path, x, ssrc=0x1234ABCD, first_seq=100, first_timestamp=5000)
    assert ssrc == 0x1234ABCD
    y = pcap_audio(path)
    assert y.size == -(-x.size // 160) * 160  # padded to whole 20 ms packets
    assert np.all(y[x.size :] == ALAW_TO_LINEAR[ALAW_SILENCE] / 32768.0)
    err = np.abs(y[: x.size] - x)
    assert (err <= np.maximum(8 / 32768, np.abs(x) / 32) + 1e-6).all()
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(err.astype(np.float64) ** 2))
    assert snr > 30, snr


def test_written_pcap_is_like_sipps(tmp_path):
    path = tmp_path / "w.pcap"
    x = np.zeros(RATE // 2, np.float32)  # 0.5 s: 25 packets
    write_rtp_pcap(path, x, first_seq=65530, first_timestamp=2**32 - 320, start_time=1000.0)
    head = path.read_bytes()[:24]
    assert struct.unpack("<IHHiIII", head) == (0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET)
    linktype, frames = read_pcap(path)
    assert linktype == LINKTYPE_ETHERNET and len(frames) == 25
    for i, (t, frame) in enumerate(frames):
        assert t == pytest.approx(1000.0 + 0.02 * i, abs=1e-6)
        assert frame[12:14] == b"\x08\x00"
        ip, udp = frame[14:34], frame[34:]
        assert ip[0] == 0x45 and ip[9] == 17 and _checksum(ip) == 0
        assert struct.unpack("!H", ip[2:4])[0] == 20 + len(udp)
        assert struct.unpack("!H", udp[4:6])[0] == len(udp) == 8 + 12 + 160
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
        assert _checksum(pseudo + udp) == 0
    pkts = read_rtp(path)
    assert [p.seq for p in pkts] == [(65530 + i) % 65536 for i in range(25)]  # wraps
    assert [p.timestamp for p in pkts] == [(2**32 - 320 + 160 * i) % 2**32 for i in range(25)]
    assert [p.marker for p in pkts] == [True] + [False] * 24
    assert {(p.pt, p.ssrc, len(p.payload), p.src, p.dst) for p in pkts} == {
        (8, pkts[0].ssrc, 160, ("10.0.0.1", 40000), ("10.0.0.2", 50000))
    }
    assert [p.seq for p in rtp_stream(pkts)] == [p.seq for p in pkts]


def test_stream_reordered_duplicated_and_other_link_types(tmp_path):
    x = dtmf_sequence("5", lead_s=0.1, tail_s=0.1)
    path = tmp_path / "a.pcap"
    write_rtp_pcap(path, x, first_seq=65500)
    want = pcap_audio(path)
    _, frames = read_pcap(path)
    shuffled = frames[:]
    random.Random(3).shuffle(shuffled)
    shuffled.insert(5, shuffled[9])  # a duplicate
    # A second stream (another SSRC) that must not get mixed in.
    other = tmp_path / "b.pcap"
    write_rtp_pcap(other, np.full(800, 0.5, np.float32), ssrc=7)
    shuffled += read_pcap(other)[1][:3]
    write_pcap(tmp_path / "eth.pcap", shuffled)
    assert np.array_equal(pcap_audio(tmp_path / "eth.pcap"), want)
    assert rtp_stream(read_rtp(tmp_path / "eth.pcap"), ssrc=7)[0].ssrc == 7

    sll = [(t, struct.pack("!HHH8sH", 0, 1, 6, b"\2" * 6 + b"\0\0", 0x0800) + f[14:])
           for t, f in frames]  # fmt: skip
    write_pcap(tmp_path / "sll.pcap", sll, LINKTYPE_LINUX_SLL)
    assert np.array_equal(pcap_audio(tmp_path / "sll.pcap"), want)
    write_pcap(tmp_path / "raw.pcap", [(t, f[14:]) for t, f in frames], LINKTYPE_RAW)
    assert np.array_equal(pcap_audio(tmp_path / "raw.pcap"), want)
    # Ethernet with an 802.1Q tag.
    vlan = [(t, f[:12] + b"\x81\x00\x00\x05" + f[12:]) for t, f in frames]
    write_pcap(tmp_path / "vlan.pcap", vlan)
    assert np.array_equal(pcap_audio(tmp_path / "vlan.pcap"), want)
    # Big-endian, nanosecond timestamps.
    be = [struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET)]
    for t, f in frames:
        be.append(struct.pack(">IIII", int(t), round((t % 1) * 1e9), len(f), len(f)) + f)
    (tmp_path / "be.pcap").write_bytes(b"".join(be))
    assert np.array_equal(pcap_audio(tmp_path / "be.pcap"), want)
    assert read_rtp(tmp_path / "be.pcap")[1].time == pytest.approx(frames[1][0], abs=1e-6)


def test_a_lost_packet_is_silence_in_its_place(tmp_path):
    x = np.full(RATE // 10, 0.25, np.float32)  # 5 packets
    path = tmp_path / "loss.pcap"
    write_rtp_pcap(path, x)
    _, frames = read_pcap(path)
    write_pcap(path, frames[:2] + frames[3:])
    y = pcap_audio(path)
    assert y.size == x.size
    assert np.all(y[320:480] == 0) and np.all(np.abs(y[:320] - 0.25) < 0.01)


@needs_sipp_pcaps
def test_sipps_g711a_pcap_is_seven_seconds_of_sound():
    pkts = read_rtp(G711A)
    stream = rtp_stream(pkts)
    assert len(stream) == len(pkts) == 236
    assert {p.pt for p in stream} == {8} and {len(p.payload) for p in stream} == {240}  # 30 ms
    x = pcap_audio(G711A)
    assert 7.0 <= x.size / RATE <= 7.1
    span = sound_span(x)
    assert span is not None
    assert 6.3 <= (span[1] - span[0]) / RATE <= 7.1  # 0.6 s of idle code, then sound to the end
    assert active_duration(x, RATE) > 6.0
    assert rms_dbfs(x) > -30


@needs_sipp_pcaps
def test_sipps_rfc4733_pound_pcap_parses():
    pkts = read_rtp(SIPP_PCAPS / "dtmf_2833_pound.pcap")
    assert {p.pt for p in pkts} == {101}
    assert {p.payload[0] for p in pkts} == {11}  # event 11 is '#'
    assert pkts[0].marker and pkts[-1].payload[1] & 0x80  # start ... end bit
    assert pcap_audio(SIPP_PCAPS / "dtmf_2833_pound.pcap").size == 0  # no audio in it


def test_dtmf_sequence_levels_timing_and_detection(tmp_path):
    x = dtmf_sequence("123#", tone_ms=60, gap_ms=100, lead_s=1.5, tail_s=0.5, level_dbm0=-10)
    assert x.size == round(RATE * (1.5 + 4 * 0.06 + 3 * 0.1 + 0.5))
    span = sound_span(x, threshold_dbfs=-60, frame=8)
    assert span == (12000, 12000 + round(RATE * (4 * 0.06 + 3 * 0.1)))
    first = x[12000 : 12000 + 480].astype(np.float64)  # '1': 697 + 1209 Hz
    spectrum = np.abs(np.fft.rfft(first, 8000)) * 2 / first.size
    for f in DTMF_FREQS["1"]:
        amp = spectrum[int(f) - 3 : int(f) + 4].max()
        assert 20 * np.log10(amp / DBM0_AMPLITUDE) == pytest.approx(-10, abs=0.5)
    # Through the pcap (A-law) and the gateway's own detector: the four keys, in order.
    path = tmp_path / "d.pcap"
    write_rtp_pcap(path, x)
    pcm = (np.clip(pcap_audio(path), -1, 1) * 32767).astype("<i2").tobytes()
    det = InbandDtmfDetector(RATE)
    got = "".join(d for i in range(0, len(pcm), 320) for d in det.feed(pcm[i : i + 320]))
    assert got == "123#"


def test_align_and_carried_see_shifts_and_cuts():
    rng = np.random.default_rng(7)
    sent = np.concatenate([np.zeros(800), 0.2 * rng.standard_normal(4 * RATE)]).astype(np.float32)
    rec = np.concatenate([np.zeros(3000), sent, np.zeros(2000)]).astype(np.float32)
    lag, coeff = align(rec, sent)
    assert lag == 3000 and coeff > 0.999
    whole = carried(rec, sent, lag)
    assert whole.first == 800 and whole.end == sent.size and whole.fraction == 1.0
    assert (whole.recorded_first, whole.recorded_end) == (3800, 3000 + sent.size)
    assert whole.seconds == whole.recorded_seconds == pytest.approx(4.0)
    # A recording that lost its last 0.5 s carries 0.5 s less.
    cut = rec[: 3000 + sent.size - RATE // 2]
    lag2, coeff2 = align(cut, sent)
    short = carried(cut, sent, lag2)
    assert lag2 == 3000 and coeff2 > 0.999
    assert short.seconds == pytest.approx(3.5) and short.fraction == pytest.approx(3.5 / 4.0)
    # Misaligned by one frame, or replaced by noise: nothing is carried.
    assert carried(rec, sent, lag + 160).carried_frames == 0
    noise = 0.2 * rng.standard_normal(rec.size).astype(np.float32)
    assert carried(noise, sent, lag).carried_frames == 0
    assert abs(align(noise, sent)[1]) < 0.1


@needs_sipp_pcaps
def test_best_match_finds_a_beep_only_where_there_is_one():
    speech = pcap_audio(G711A)
    b = beep(RATE)
    assert best_match(speech, b) < 0.5
    assert best_match(np.zeros(RATE, np.float32), b) < 0.01
    with_beep = speech.copy()
    with_beep[20000 : 20000 + b.size] += 0.3 * b  # quieter than the speech around it? no matter
    assert best_match(with_beep, b) > 0.5
    alone = np.concatenate([np.zeros(4000), 0.01 * b, np.zeros(4000)]).astype(np.float32)
    assert best_match(alone, b) > 0.99


def test_blocks_follow_a_jitter_buffer_slip():
    """10 ms of concealment inserted mid-way (what PJSIP's jitter buffer does under load)."""
    rng = np.random.default_rng(11)
    sent = np.concatenate([np.zeros(800), 0.2 * rng.standard_normal(6 * RATE)]).astype(np.float32)
    cut = 800 + 3 * RATE + 123
    rec = np.concatenate(
        [np.zeros(5000), sent[:cut], 0.05 * np.ones(80), sent[cut:], np.zeros(3000)]
    ).astype(np.float32)
    lag, coeff = align(rec, sent)
    assert lag in (5000, 5080) and coeff < 0.7  # one lag fits only part of it
    assert carried(rec, sent, lag).fraction < 0.6
    blocks = align_blocks(rec, sent, lag)
    assert {b.lag for b in blocks} == {5000, 5080}
    assert pooled_correlation(blocks) > 0.97
    got = carried(rec, sent, blocks)
    assert got.fraction > 0.99  # all but the frame the slip cuts through
    assert got.seconds == pytest.approx(6.0)
    assert got.recorded_seconds == pytest.approx(6.01)
    # A block that is not in the recording (a cut-off end) is not counted as carried.
    short = rec[: 5000 + 800 + 2 * RATE]
    blocks = align_blocks(short, sent, 5000)
    assert [b.coeff == b.coeff for b in blocks][:3] == [True, True, True]
    assert all(b.coeff != b.coeff for b in blocks[5:])
    assert carried(short, sent, blocks).seconds == pytest.approx(2.0, abs=0.02)
