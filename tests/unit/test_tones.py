"""tests/tones.py: Goertzel levels tell each test tone apart, alone, mixed and through G.711."""

from __future__ import annotations

import numpy as np

from tests.tones import (
    HEARD_DBFS,
    TEST_TONES,
    heard,
    hears,
    levels,
    onset,
    read_wav,
    sine,
    write_wav,
)

RATE = 8000


def mulaw(x):
    """8-bit mu-law companding and back (G.711-like quantisation noise)."""
    mu = 255.0
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    q = np.round(y * 127) / 127
    return np.sign(q) * np.expm1(np.abs(q) * np.log1p(mu)) / mu


def test_each_tone_alone_is_heard_and_no_other():
    for f in TEST_TONES:
        x = mulaw(sine(f, 1.0, amp=0.35))
        assert heard(x, RATE) == {f}, (f, levels(x, RATE))


def test_mixed_tones_are_each_heard_and_far_from_the_threshold():
    x = mulaw(sine(697, 1.0, amp=0.3) + sine(941, 1.0, amp=0.3) + sine(1477, 1.0, amp=0.3))
    lv = levels(x, RATE)
    assert {f for f, db in lv.items() if db > HEARD_DBFS} == {697, 941, 1477}
    assert min(lv[f] for f in (697, 941, 1477)) > HEARD_DBFS + 15
    assert max(db for f, db in lv.items() if f not in (697, 941, 1477)) < HEARD_DBFS - 20


def test_quiet_tone_and_silence_and_spans():
    x = np.concatenate([sine(770, 1.0, amp=0.3), np.zeros(RATE)])
    assert hears(x, RATE, 770, 0.0, 1.0) and not hears(x, RATE, 770, 1.0, 2.0)
    assert not hears(sine(770, 1.0, amp=0.003), RATE, 770)  # -50 dBFS: not "heard"
    assert heard(np.zeros(RATE), RATE) == set()


def test_onset_of_a_burst():
    x = np.concatenate([np.zeros(int(0.5 * RATE)), sine(1209, 0.3)])
    t = onset(x, RATE, 1209)
    assert t is not None and abs(t - 0.5) < 0.015


def test_wav_round_trip_and_unfinished_header(tmp_path):
    p = tmp_path / "a.wav"
    write_wav(p, sine(852, 0.5), RATE)
    x, rate = read_wav(p)
    assert rate == RATE and len(x) == RATE // 2 and hears(x, rate, 852)
    raw = bytearray(p.read_bytes())
    raw[40:44] = (0).to_bytes(4, "little")  # a recorder still writing: data size not set yet
    p.write_bytes(bytes(raw))
    y, _ = read_wav(p)
    assert len(y) == RATE // 2
