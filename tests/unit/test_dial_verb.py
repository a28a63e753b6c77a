"""`dial` in the DSL against a fake call and a fake Dialer: the request it makes, the Dial*
fields it keeps, the voice callback after a dial that ends its document, the dial cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsl.context import CallEnded, DialRequest, DialResult, DialTarget, VoiceAppError
from dsl.interpreter import MAX_DIALS, Interpreter
from dsl.phone import set_default_region
from tests.unit.test_dsl_fakes import CALLBACK_URL, Fake, doc, say


class FakeDialer:
    def __init__(self, result: DialResult | None = None) -> None:
        self.requests: list[DialRequest] = []
        self.result = result or DialResult("completed", "leg-1", 7, 200)

    async def dial(self, request: DialRequest) -> DialResult:
        self.requests.append(request)
        if self.result.status == "canceled":
            raise CallEnded()
        return self.result


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def with_dialer(fake: Fake, result: DialResult | None = None) -> FakeDialer:
    dialer = FakeDialer(result)
    fake.ctx.dialer = dialer
    return dialer


async def test_the_request_is_plain_values(fake: Fake) -> None:
    set_default_region("KE")
    dialer = with_dialer(fake)
    fake.app.routes[CALLBACK_URL] = {}
    await Interpreter(fake.ctx).run(doc(
        {"dial": {"numbers": ["0712345678", "+254711000001"], "sequential": True,
                  "timeout": 5, "callerId": "+254700000009", "timeLimit": 60,
                  "record": "record-from-ringing"}},
    ))
    assert dialer.requests == [DialRequest(
        targets=(DialTarget("number", "+254712345678"), DialTarget("number", "+254711000001")),
        sequential=True, caller_id="+254700000009", timeout_s=5, record="record-from-ringing",
        time_limit_s=60,
    )]


async def test_a_dial_that_ends_its_document_posts_the_callback_and_runs_the_reply(
    fake: Fake,
) -> None:
    with_dialer(fake, DialResult("busy", "leg-9", 0, 486))
    fake.app.routes[CALLBACK_URL] = {"actions": [say("voicemail")]}
    result = await Interpreter(fake.ctx).run(doc({"dial": {"sip": "sip:bob@example.com"}}))
    fetch = fake.kinds("fetch")[-1]
    assert fetch[1:3] == (CALLBACK_URL, "POST")
    assert {k: fetch[3][k] for k in ("DialCallStatus", "DialCallSid", "DialCallDuration",
                                     "DialSipStatus")} == {
        "DialCallStatus": "busy", "DialCallSid": "leg-9", "DialCallDuration": "0",
        "DialSipStatus": "486"}
    assert fake.said() == ["voicemail"] and result.ended_by == "document_end"


async def test_a_dial_followed_by_actions_goes_on_and_keeps_its_fields(fake: Fake) -> None:
    with_dialer(fake)
    await Interpreter(fake.ctx).run(doc({"dial": {"number": "+254711000001"}}, say("after")))
    assert fake.said() == ["after"]
    assert not fake.kinds("fetch")  # no callback: the document had more to run
    assert fake.ctx.params["DialCallStatus"] == "completed"  # on every later request


async def test_the_caller_hanging_up_ends_the_run_without_a_callback(fake: Fake) -> None:
    with_dialer(fake, DialResult("canceled"))
    result = await Interpreter(fake.ctx).run(doc({"dial": {"number": "+254711000001"}}))
    assert result.ended_by == "caller"
    assert not fake.kinds("fetch")


async def test_a_voice_app_that_dials_forever_fails_the_call(fake: Fake) -> None:
    dialer = with_dialer(fake, DialResult("failed", "", 0, None))
    again = {"actions": [{"dial": {"number": "+254711000001"}}]}
    fake.app.routes[CALLBACK_URL] = again
    with pytest.raises(VoiceAppError) as err:
        await Interpreter(fake.ctx).run(doc({"dial": {"number": "+254711000001"}}))
    assert err.value.code == "dial_loop"
    assert len(dialer.requests) == MAX_DIALS


async def test_without_a_dialer_dial_is_unsupported(fake: Fake) -> None:
    with pytest.raises(VoiceAppError) as err:
        await Interpreter(fake.ctx).run(doc({"dial": {"number": "+254711000001"}}))
    assert err.value.code == "verb_unsupported"
