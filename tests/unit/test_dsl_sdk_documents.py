"""Documents the SDK (@sautikit/node 0.5.0) can emit are accepted, with the SDK's defaults."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dsl.document import parse_document
from dsl.errors import DocumentError
from dsl.interpreter import Interpreter
from dsl.verbs import Conference, Dial, Record, Stream
from gateway.routing import normalise_e164
from tests.unit.test_dsl_fakes import Fake, doc


def one(item: dict[str, Any]) -> Any:
    return parse_document({"actions": [item]}).actions[0]


def test_conference_max_participants_zero_is_the_platform_default() -> None:
    conf = one({"conference": {"name": "room", "maxParticipants": 0}})
    assert isinstance(conf, Conference) and conf.max_participants == 0


def test_conference_beep_defaults_to_false() -> None:
    assert one({"conference": {"name": "room"}}).beep is False


@pytest.mark.parametrize("rate", [24000, 44100, 22050.5])
def test_stream_rates_are_any_positive_number(rate: float) -> None:
    params = {"url": "wss://x.example/s", "bidirectionalSamplingRate": rate}
    params["inputSamplingRate"] = rate
    s = one({"stream": params})
    assert isinstance(s, Stream) and s.input_sampling_rate == rate


def test_stream_rate_zero_is_refused() -> None:
    with pytest.raises(DocumentError):
        one({"stream": {"url": "wss://x.example/s", "inputSamplingRate": 0}})


def test_dial_national_number_is_normalised_like_inbound_routing() -> None:
    d = one({"dial": {"number": "0712345678"}})
    assert isinstance(d, Dial) and d.number == "+254712345678" == normalise_e164("0712345678")
    d = one({"dial": {"numbers": ["0712345678", "+254722000000"]}})
    assert d.numbers == ["+254712345678", "+254722000000"]


def test_dial_sdk_refusals_stay() -> None:
    with pytest.raises(DocumentError) as e:
        one({"dial": {"number": "0712345678", "numbers": ["+254722000000"]}})
    assert e.value.errors[0].code == "ErrDialNumberNumbers"
    with pytest.raises(DocumentError) as e:
        one({"dial": {}})
    assert e.value.errors[0].code == "ErrDialTargetXOR"


def test_dial_record_unknown_string_is_accepted_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    d = one({"dial": {"number": "+254712345678", "record": "do-not-record"}})
    assert d.record is None
    assert "record-from-answer or record-from-ringing" in caplog.text
    assert one({"dial": {"sip": "sip:a@b.example", "record": "record-from-answer"}}).record


def test_record_zero_timeout_and_max_length_are_accepted() -> None:
    r = one({"record": {"timeout": 0, "maxLength": 0}})
    assert isinstance(r, Record) and r.finish_on_key == ""


def test_say_empty_text_is_accepted() -> None:
    assert one({"say": {"text": ""}}).text == ""


async def test_say_empty_text_is_skipped_and_the_call_goes_on(tmp_path: Path) -> None:
    fake = Fake(tmp_path)
    result = await Interpreter(fake.ctx).run(doc({"say": {"text": ""}}, {"say": {"text": "hi"}}))
    assert fake.said() == ["hi"] and result.ended_by == "document_end" and not result.errors


def test_deep_documents_are_refused_without_recursion() -> None:
    from dsl.document import MAX_DEPTH

    deep = b'{"actions": [' + b"[" * 30_000 + b"]" * 30_000 + b"]}"
    with pytest.raises(DocumentError) as e:
        parse_document(deep)
    assert e.value.errors[0].code == "document.too_deep"
    assert f"at most {MAX_DEPTH}" in str(e.value)
    # Brackets inside strings do not count.
    text = '{"actions": [{"say": {"text": "' + "[" * 100 + '\\"{"}}]}'
    assert parse_document(text.encode()).actions[0].text.startswith("[[")


def test_ai_agent_is_modelled_as_the_sdk_validates_it() -> None:
    from dsl.verbs import AiAgent

    agent = {"aiAgent": {"agentId": "ag_1", "handover": {"callbackUrl": "https://a.example/h"}}}
    parsed = parse_document({"actions": [{"say": {"text": "hi"}}, agent]}).actions[1]
    assert isinstance(parsed, AiAgent) and parsed.agent_id == "ag_1"
    with pytest.raises(DocumentError) as e:
        parse_document({"actions": [agent, {"say": {"text": "after"}}]})
    assert e.value.errors[0].code == "aiAgent.not_last"
    with pytest.raises(DocumentError) as e:
        one({"aiAgent": {}})
    assert e.value.errors[0].path == "actions[0].aiAgent.agentId"
    two = {"callbackUrl": "https://a.example/h", "voicemail": {}}
    with pytest.raises(DocumentError) as e:
        one({"aiAgent": {"agentId": "a", "handover": two}})
    assert e.value.errors[0].code == "aiAgent.handover"


async def test_ai_agent_fails_the_call_as_verb_unsupported(tmp_path: Path) -> None:
    from dsl.context import VoiceAppError

    fake = Fake(tmp_path)
    with pytest.raises(VoiceAppError) as e:
        await Interpreter(fake.ctx).run(doc({"say": {"text": "hi"}}, {"aiAgent": {"agentId": "a"}}))
    assert (e.value.code, e.value.message) == (
        "verb_unsupported",
        "actions[1].aiAgent: aiAgent is not supported yet",
    )


async def test_a_skipped_prompt_is_logged_with_the_call_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dsl.context import MediaError

    fake = Fake(tmp_path)

    async def broken(url: str) -> Path:
        raise MediaError("media_fetch_failed", "HTTP 404")

    fake.ctx.prompts.audio = broken  # type: ignore[method-assign]
    await Interpreter(fake.ctx).run(doc({"play": {"url": "https://cdn.example/x.wav"}}))
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert fake.leg.call_id in line and "actions[0].play" in line
