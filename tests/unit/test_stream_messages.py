"""gateway/streams/messages.py: the server's text frames parsed one model per `type` (extra keys
ignored, wrong ones named), and every frame the gateway sends carrying a top-level `event`."""

from __future__ import annotations

import json

import pytest

from gateway.streams import messages as m


def test_play_audio_defaults_and_extras_ignored() -> None:
    cmd = m.parse(json.dumps({"type": "playAudio", "seq": 7,
                              "data": {"audioContent": "AAA=", "extra": 1}}))
    assert isinstance(cmd, m.PlayAudio)
    assert cmd.data.audio_content == "AAA="
    assert cmd.data.audio_content_type == "raw"
    assert cmd.data.sample_rate is None


def test_play_audio_wav_with_rate() -> None:
    cmd = m.parse(json.dumps({"type": "playAudio", "data": {
        "audioContent": "AAA=", "audioContentType": "wav", "sampleRate": 24000}}))
    assert isinstance(cmd, m.PlayAudio)
    assert cmd.data.audio_content_type == "wav"
    assert cmd.data.sample_rate == 24000


@pytest.mark.parametrize(("frame", "model"), [
    ({"type": "killAudio"}, m.KillAudio),
    ({"type": "mark", "data": {"name": "m1"}}, m.Mark),
    ({"type": "clearMarks"}, m.ClearMarks),
    ({"type": "disconnect"}, m.Disconnect),
    ({"type": "handover"}, m.Handover),
    ({"type": "handover", "data": {"reason": "done"}}, m.Handover),
    ({"type": "error", "message": "busy"}, m.ServerError),
    ({"type": "error", "data": {"message": "busy"}}, m.ServerError),
])
def test_each_type(frame: dict[str, object], model: type) -> None:
    assert isinstance(m.parse(json.dumps(frame)), model)


def test_handover_data_and_mark_name() -> None:
    h = m.parse('{"type": "handover", "data": {"reason": "done", "n": 2}}')
    assert isinstance(h, m.Handover) and h.data == {"reason": "done", "n": 2}
    k = m.parse('{"type": "mark", "data": {"name": "greeting-end"}}')
    assert isinstance(k, m.Mark) and k.data.name == "greeting-end"


@pytest.mark.parametrize(("text", "why"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('"playAudio"', "expected a JSON object"),
    ('{"data": {}}', 'no "type"'),
    ('{"type": 3}', 'no "type"'),
    ('{"type": "sendDigits"}', "unknown type 'sendDigits'"),
])
def test_bad_frames(text: str, why: str) -> None:
    with pytest.raises(m.BadFrame) as e:
        m.parse(text)
    assert str(e.value) == why


@pytest.mark.parametrize(("frame", "where"), [
    ({"type": "playAudio", "data": {}}, "playAudio: data.audioContent"),
    ({"type": "playAudio"}, "playAudio: data"),
    ({"type": "playAudio", "data": {"audioContent": "AA==", "audioContentType": "mp3"}},
     "playAudio: data.audioContentType"),
    ({"type": "playAudio", "data": {"audioContent": "AA==", "sampleRate": 0}},
     "playAudio: data.sampleRate"),
    ({"type": "playAudio", "data": {"audioContent": ""}}, "playAudio: data.audioContent"),
    ({"type": "mark", "data": {}}, "mark: data.name"),
    ({"type": "mark", "data": {"name": ""}}, "mark: data.name"),
    ({"type": "mark", "data": {"name": "x" * 257}}, "mark: data.name"),
    ({"type": "handover", "data": [1]}, "handover: data"),
])
def test_wrong_fields_are_named(frame: dict[str, object], where: str) -> None:
    with pytest.raises(m.BadFrame) as e:
        m.parse(json.dumps(frame))
    assert str(e.value).startswith(where + ":"), str(e.value)


def test_outgoing_frames_all_carry_event() -> None:
    frames = [json.loads(t) for t in (
        m.dtmf("5", 160), m.mark("a", True), m.mark("b", False), m.play_done(3, True),
        m.error("nope"))]
    assert all(isinstance(f.get("event"), str) for f in frames)
    assert frames[0] == {"event": "dtmf", "dtmf": "5", "duration": 160}
    assert frames[1] == {"type": "mark", "event": "mark",
                         "data": {"name": "a", "event": "playout"}}
    assert frames[2]["data"] == {"name": "b", "event": "cleared"}
    assert frames[3] == {"type": "playDone", "event": "playDone",
                         "data": {"id": 3, "completed": True}}
    assert frames[4] == {"type": "error", "event": "error", "data": {"message": "nope"}}


def test_dumps_is_compact() -> None:
    assert m.dumps({"event": "start", "a": 1}) == '{"event":"start","a":1}'
