"""record: where the file goes, the recording-ready event, and the result request."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsl.context import RecordResult
from dsl.interpreter import Interpreter
from tests.unit.test_dsl_fakes import CALLBACK_URL, Fake, doc, say

ACTION = "https://app.example/voice/recorded"


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    fake = Fake(tmp_path)
    fake.app.routes[ACTION] = {"actions": [say("got it")]}
    fake.app.routes[CALLBACK_URL] = {"actions": [say("default")]}
    return fake


async def test_records_emits_the_event_then_posts_the_result(fake: Fake, tmp_path: Path) -> None:
    result = await Interpreter(fake.ctx).run(doc({"record": {"action": "recorded"}}, say("no")))
    ((_, dest, *_),) = fake.kinds("record")
    ((_, rec_id, path, duration, fmt),) = fake.kinds("recording_ready")
    assert dest == tmp_path / f"{rec_id}.wav" and path == dest
    assert len(rec_id) >= 32
    assert (duration, fmt) == (2.6, "wav")
    assert fake.kinds("fetch") == [
        (
            "fetch",
            ACTION,  # "recorded" resolved against the document's URL
            "POST",
            {
                "RecordingUrl": f"https://rec.example/{rec_id}",
                "RecordingDuration": "3",
                "recordingId": rec_id,
            },
        )
    ]
    order = [op[0] for op in fake.ops if op[0] in ("record", "recording_ready", "fetch")]
    assert order == ["record", "recording_ready", "fetch"]
    assert fake.said() == ["got it"]
    assert result.ended_by == "document_end"


async def test_parameters_reach_the_leg(fake: Fake) -> None:
    params = {"timeout": 0, "maxLength": 60, "finishOnKey": "*", "playBeep": False}
    await Interpreter(fake.ctx).run(doc({"record": params}))
    ((_, _, max_length, silence, key, beep),) = fake.kinds("record")
    assert (max_length, silence, key, beep) == (60, 5, "*", False)  # timeout 0 = the default


async def test_defaults_reach_the_leg(fake: Fake) -> None:
    await Interpreter(fake.ctx).run(doc({"record": {}}))
    ((_, _, max_length, silence, key, beep),) = fake.kinds("record")
    assert (max_length, silence, key, beep) == (3600, 5, "", True)  # SDK: no finish key


async def test_default_action_is_the_voice_callback_and_get_is_honoured(fake: Fake) -> None:
    await Interpreter(fake.ctx).run(doc({"record": {"method": "GET"}}))
    assert [op[1:3] for op in fake.kinds("fetch")] == [(CALLBACK_URL, "GET")]
    assert fake.said() == ["default"]


async def test_finish_key_is_sent_as_digits(fake: Fake) -> None:
    fake.leg.record_result = lambda p: RecordResult(p, 11.4, "finishOnKey", "#")
    await Interpreter(fake.ctx).run(doc({"record": {"action": ACTION}}))
    ((*_, extra),) = fake.kinds("fetch")
    assert extra["Digits"] == "#"
    assert extra["RecordingDuration"] == "11"


async def test_empty_reply_lets_the_document_go_on(fake: Fake) -> None:
    fake.app.routes[ACTION] = {"actions": []}
    await Interpreter(fake.ctx).run(doc({"record": {"action": ACTION}}, say("after")))
    assert fake.said() == ["after"]


async def test_caller_hangup_mid_record_still_emits_and_posts(fake: Fake) -> None:
    fake.leg.record_result = lambda p: RecordResult(p, 4.2, "hangup")
    result = await Interpreter(fake.ctx).run(doc({"record": {"action": ACTION}}, say("no")))
    assert len(fake.kinds("recording_ready")) == 1
    ((_, url, method, extra),) = fake.kinds("fetch")
    assert (url, method, extra["RecordingDuration"]) == (ACTION, "POST", "4")
    assert fake.said() == []  # the reply has no call left to run on
    assert result.ended_by == "caller"
    assert not fake.kinds("hangup")


async def test_caller_hangup_mid_record_with_a_failing_app(fake: Fake) -> None:
    fake.leg.record_result = lambda p: RecordResult(p, 1.0, "hangup")
    del fake.app.routes[ACTION]
    result = await Interpreter(fake.ctx).run(doc({"record": {"action": ACTION}}))
    assert result.ended_by == "caller"
    assert [e.code for e in result.errors] == ["callback_http_status"]
