"""In-band DTMF detector against Q.24-style requirements, on synthetic tones and espeak speech."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from media.dtmf_inband import InbandDtmfDetector

ALL_DIGITS = "123A456B789C*0#D"
# Keypad row-major: row index -> low group, column index -> high group.
LOW = {d: (697, 770, 852, 941)[i // 4] for i, d in enumerate(ALL_DIGITS)}
HIGH = {d: (1209, 1336, 1477, 1633)[i % 4] for i, d in enumerate(ALL_DIGITS)}

Signal = npt.NDArray[np.float64]


def amp(dbm0: float) -> float:
    # A full-scale sine (32767) is +3.14 dBm0 in 16-bit linear PCM.
    return float(32767.0 * 10.0 ** ((dbm0 - 3.14) / 20.0))


def tone(
    digit: str,
    ms: float,
    fs: int = 8000,
    level: float = -20.0,
    twist: float = 0.0,
    dev: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
) -> Signal:
    """Low group at `level` dBm0, high group at `level + twist`, random phases."""
    rng = rng or np.random.default_rng(0)
    t = np.arange(round(ms * fs / 1000)) / fs
    ph = rng.uniform(0, 2 * np.pi, 2)
    lo = amp(level) * np.sin(2 * np.pi * LOW[digit] * (1 + dev[0]) * t + ph[0])
    hi = amp(level + twist) * np.sin(2 * np.pi * HIGH[digit] * (1 + dev[1]) * t + ph[1])
    out: Signal = lo + hi
    return out


def silence(ms: float, fs: int = 8000) -> Signal:
    return np.zeros(round(ms * fs / 1000))


def pcm(x: Signal) -> bytes:
    return np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()


def detect(x: Signal, fs: int = 8000, chunk: int | None = None) -> str:
    """Feed `x` in `chunk`-byte pieces (default: 20 ms frames) and join what comes out."""
    det = InbandDtmfDetector(fs)
    data = pcm(x)
    step = chunk or 2 * fs // 50
    return "".join(d for i in range(0, len(data), step) for d in det.feed(data[i : i + step]))


def sequence(
    digits: str,
    fs: int = 8000,
    on: float = 40,
    off: float = 40,
    level: float = -20.0,
    twist: float = 0.0,
    dev: tuple[float, float] = (0.0, 0.0),
) -> Signal:
    """`on` ms of each digit, `off` ms of silence before and after each."""
    rng = np.random.default_rng(1)
    parts = [silence(off, fs)]
    for d in digits:
        parts += [tone(d, on, fs, level, twist, dev, rng), silence(off, fs)]
    return np.concatenate(parts)


# -- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize("fs", [8000, 16000])
def test_all_digits_40ms_on_40ms_off_in_20ms_frames(fs: int) -> None:
    assert detect(sequence(ALL_DIGITS, fs), fs) == ALL_DIGITS


@pytest.mark.parametrize("fs", [8000, 16000])
@pytest.mark.parametrize("chunk", [1, 3, 77, 161, 250, 1001, 4099])
def test_all_digits_in_odd_chunk_sizes(fs: int, chunk: int) -> None:
    # Odd byte counts split samples across calls, too.
    assert detect(sequence(ALL_DIGITS, fs), fs, chunk) == ALL_DIGITS


def test_whole_signal_in_one_call() -> None:
    det = InbandDtmfDetector()
    assert "".join(det.feed(pcm(sequence(ALL_DIGITS)))) == ALL_DIGITS


@pytest.mark.parametrize("fs", [8000, 16000])
def test_40ms_tones_at_any_alignment(fs: int) -> None:
    rng = np.random.default_rng(2)
    for i in range(48):
        d = ALL_DIGITS[i % 16]
        x = np.concatenate(
            [silence(rng.uniform(0, 30), fs), tone(d, 40, fs, rng=rng), silence(80, fs)]
        )
        assert detect(x, fs) == d, f"digit {d} try {i}"


@pytest.mark.parametrize("level", [-20.0, -10.0, -3.0])  # -3 dBm0 each = 0 dBm0 total
def test_levels(level: float) -> None:
    assert detect(sequence(ALL_DIGITS, level=level)) == ALL_DIGITS


@pytest.mark.parametrize(
    ("low_level", "twist"),
    [(-20.0, 6.0), (-20.0, -6.0), (-26.0, 6.0), (-14.0, -6.0)],
    ids=["hi+6", "hi-6_weak-26", "lo-26", "lo+6"],
)
def test_twist(low_level: float, twist: float) -> None:
    assert detect(sequence(ALL_DIGITS, level=low_level, twist=twist)) == ALL_DIGITS


@pytest.mark.parametrize(
    "dev",
    [(0.015, 0.0), (-0.015, 0.0), (0.0, 0.015), (0.0, -0.015), (0.015, 0.015), (-0.015, 0.015)],
)
def test_frequency_deviation_1_5_percent_accepted(dev: tuple[float, float]) -> None:
    assert detect(sequence(ALL_DIGITS, dev=dev)) == ALL_DIGITS


@pytest.mark.parametrize("dev", [(0.035, 0.0), (-0.035, 0.0), (0.0, 0.035), (0.0, -0.035)])
def test_frequency_deviation_3_5_percent_rejected(dev: tuple[float, float]) -> None:
    assert detect(sequence(ALL_DIGITS, on=100, dev=dev)) == ""


def test_white_noise_20db_below_tone() -> None:
    rng = np.random.default_rng(3)
    x = sequence(ALL_DIGITS)
    tone_power = amp(-20.0) ** 2  # two components of amp^2 / 2 each
    x = x + rng.normal(0.0, np.sqrt(tone_power / 100.0), len(x))
    assert detect(x) == ALL_DIGITS


def test_noise_alone_is_silent() -> None:
    rng = np.random.default_rng(4)
    assert detect(rng.normal(0.0, 3000.0, 8000 * 10)) == ""


# -- timing ------------------------------------------------------------------------------


@pytest.mark.parametrize("ms", [15, 18])
@pytest.mark.parametrize("level", [-20.0, -3.0])
def test_tones_shorter_than_20ms_ignored(ms: float, level: float) -> None:
    rng = np.random.default_rng(5)
    for i in range(48):  # random sub-hop alignment
        d = ALL_DIGITS[i % 16]
        x = np.concatenate([silence(rng.uniform(0, 30)), tone(d, ms, level=level, rng=rng)])
        assert detect(np.concatenate([x, silence(80)])) == "", f"digit {d} try {i}"


@pytest.mark.parametrize("on", [40, 100])
def test_same_key_after_40ms_gap_counts_twice(on: float) -> None:
    rng = np.random.default_rng(6)
    for d in ALL_DIGITS:
        x = np.concatenate(
            [silence(rng.uniform(0, 30)), tone(d, on, rng=rng), silence(40), tone(d, on, rng=rng)]
        )
        assert detect(np.concatenate([x, silence(60)])) == d + d


def test_long_press_counts_once() -> None:
    for d in ALL_DIGITS:
        assert detect(np.concatenate([tone(d, 500), silence(60)])) == d


def test_10ms_dropout_inside_press_counts_once() -> None:
    rng = np.random.default_rng(7)
    for i in range(48):
        d = ALL_DIGITS[i % 16]
        x = tone(d, 300, rng=rng)
        start = round(rng.uniform(100, 180) * 8)
        x[start : start + 80] = 0.0  # 10 ms hole in a phase-continuous tone
        assert detect(np.concatenate([x, silence(60)])) == d, f"digit {d} try {i}"


def test_different_digits_back_to_back() -> None:
    x = np.concatenate([tone("1", 60), tone("9", 60), tone("#", 60), silence(60)])
    assert detect(x) == "19#"


def test_digit_reported_at_onset_not_release() -> None:
    det = InbandDtmfDetector()
    data = pcm(tone("5", 1000))
    frames = [data[i : i + 320] for i in range(0, len(data), 320)]
    hits = [i for i, f in enumerate(frames) if det.feed(f)]
    assert len(hits) == 1
    assert hits[0] <= 2  # confirmed within 60 ms of the start of a 1 s press


def test_reset_forgets_partial_audio_and_pressed_key() -> None:
    press = pcm(tone("7", 40))
    first, rest = press[:320], press[320:] + pcm(silence(60))
    control = InbandDtmfDetector()
    assert control.feed(first) + control.feed(rest) == ["7"]

    det = InbandDtmfDetector()
    assert det.feed(first) == []
    det.reset()
    assert det.feed(rest) == []  # 20 ms alone is no key press

    det.feed(b"\x01\x02\x03")  # a sample and a half pending
    det.reset()
    assert "".join(det.feed(pcm(sequence("159")))) == "159"  # stays sample-aligned

    long_press = pcm(tone("7", 200))
    assert det.feed(long_press) == ["7"]
    det.reset()
    assert det.feed(long_press) == ["7"]  # the key is not still "held" after a reset


def test_rejects_unsupported_sample_rate() -> None:
    with pytest.raises(ValueError):
        InbandDtmfDetector(11025)
    with pytest.raises(ValueError):
        InbandDtmfDetector(4000)


# -- talk-off ----------------------------------------------------------------------------

EN_TEXT = (
    "Thank you for calling the customer care line. Your call is important to us, and it may be "
    "recorded for quality and training purposes. Please listen carefully, as our menu options "
    "have recently changed. For account balances and recent transactions, stay on the line. "
    "To report a lost or stolen card, please hold while we transfer you to an agent. The quick "
    "brown fox jumps over the lazy dog, while seven sleepy sheep sit silently beside the "
    "shimmering stream. She sells sea shells by the sea shore. Our offices are open from eight "
    "in the morning until six in the evening, Monday through Friday. We apologise for the "
    "delay; all of our representatives are currently assisting other customers. Peter Piper "
    "picked a peck of pickled peppers. Please have your reference number ready, and speak "
    "clearly after the tone. Goodbye, and thank you for choosing our service."
)
SW_TEXT = (
    "Karibu kwenye huduma kwa wateja. Simu yako ni muhimu kwetu, na inaweza kurekodiwa kwa "
    "ajili ya ubora na mafunzo. Tafadhali sikiliza kwa makini, kwa sababu chaguo zetu "
    "zimebadilika hivi karibuni. Kwa salio la akaunti na miamala ya hivi karibuni, endelea "
    "kusubiri. Kuripoti kadi iliyopotea au kuibiwa, tafadhali subiri tukuunganishe na wakala. "
    "Habari za asubuhi, mwalimu wetu amefika shuleni mapema leo, na wanafunzi wote wamekaa "
    "kimya darasani. Mvua kubwa imenyesha jana usiku katika mji wa Mombasa, na wakulima wa "
    "Arusha wanafurahia mavuno mazuri mwaka huu. Samahani kwa kuchelewa; wawakilishi wetu wote "
    "wanawahudumia wateja wengine kwa sasa. Asante sana kwa kuchagua huduma yetu, na uwe na "
    "siku njema. Haraka haraka haina baraka, na pole pole ndio mwendo."
)
# (voice, pitch): the default voices, plus high-pitched female variants, whose harmonics
# sit closest to DTMF pairs and came nearest to a false digit while tuning.
VOICES = [("en", 50, EN_TEXT), ("sw", 50, SW_TEXT), ("en+f3", 80, EN_TEXT), ("sw+f3", 80, SW_TEXT)]


def resample(x: Signal, fs_in: int, fs_out: int) -> Signal:
    """Band-limited resampling via the FFT (ideal low-pass; fine for a test corpus)."""
    n_out = round(len(x) * fs_out / fs_in)
    spec = np.fft.rfft(x)[: n_out // 2 + 1]
    out: Signal = np.fft.irfft(spec, n_out) * (n_out / len(x))
    return out


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Signal, int]]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed: talk-off test needs it to synthesise speech")
    out = []
    tmp = tmp_path_factory.mktemp("speech")
    for voice, pitch, text in VOICES:
        wav = Path(tmp) / f"{voice}.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-p", str(pitch), "-w", str(wav), text],
            check=True,
            capture_output=True,
        )
        x, fs = sf.read(wav, dtype="float64")
        out.append((f"{voice} p{pitch}", x, fs))
    return out


@pytest.mark.parametrize("fs", [8000, 16000])
def test_talk_off_espeak_speech(speech: list[tuple[str, Signal, int]], fs: int) -> None:
    total = 0.0
    langs = set()
    for name, x, fs_in in speech:
        y = resample(x, fs_in, fs)
        # Hot level (peaks at -1 dBFS) and a quiet one: the tests are level-independent
        # except for the minimum level, so both ends are worth a look.
        for gain_db in (-1.0, -20.0):
            z = y / np.max(np.abs(y)) * 32767.0 * 10.0 ** (gain_db / 20.0)
            assert detect(z, fs) == "", f"talk-off in {name} at {gain_db} dBFS"
        total += len(y) / fs
        langs.add(name[:2])
    assert langs == {"en", "sw"}
    assert total >= 60.0, f"only {total:.0f} s of speech synthesised"


# -- cost --------------------------------------------------------------------------------


@pytest.mark.parametrize("fs", [8000, 16000])
def test_per_frame_cost(fs: int, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(8)
    step = 2 * fs // 50
    inputs = {
        "tones": pcm(np.concatenate([tone(d, 500, fs) for d in ALL_DIGITS[:8]])),
        "noise": pcm(rng.normal(0.0, 2000.0, fs * 4)),
    }
    results = {}
    for kind, data in inputs.items():
        frames = [data[i : i + step] for i in range(0, len(data) - step + 1, step)]
        det = InbandDtmfDetector(fs)
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for f in frames:
                det.feed(f)
            runs.append((time.perf_counter() - t0) / len(frames))
        results[kind] = min(runs) * 1e6
    with capsys.disabled():
        print(
            f"\n[dtmf_inband] {fs} Hz, per 20 ms frame: "
            + ", ".join(f"{k} {v:.1f} us" for k, v in results.items())
        )
    # Catches pathological regressions only; the real budget is well under 100 us.
    assert max(results.values()) < 1000.0
