"""The interpreter against a fake call: preconditions, replacement, redirects, how runs end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dsl.context import FetchedDocument, VoiceAppError
from dsl.interpreter import MAX_REDIRECTS, Interpreter
from tests.unit.test_dsl_fakes import FIRST_URL, Fake, doc, say


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


async def test_answers_implicitly_just_before_the_first_media_verb(fake: Fake) -> None:
    fake.app.routes["https://app.example/voice/next"] = {"actions": [say("one"), say("two")]}
    result = await Interpreter(fake.ctx).run(doc({"redirect": {"url": "next"}}))
    assert result.ended_by == "document_end"
    calls = [op[0] for op in fake.ops if op[0] in ("fetch", "answer", "play", "hangup")]
    assert calls == ["fetch", "answer", "play", "play", "hangup"]


@pytest.mark.parametrize("first", [{"pause": {"length": 2}}, {"getDigits": {}}, {"record": {}}])
async def test_every_media_verb_answers_first(fake: Fake, first: dict[str, Any]) -> None:
    fake.app.routes["https://app.example/voice/callback"] = {"actions": []}
    await Interpreter(fake.ctx).run(doc(first))
    assert fake.ops[0] == ("answer",)


async def test_hangup_alone_never_answers(fake: Fake) -> None:
    result = await Interpreter(fake.ctx).run(doc({"hangup": {}}, say("never")))
    assert result.ended_by == "hangup_verb"
    assert fake.ops == [("hangup",)]


async def test_already_answered_call_is_not_answered_again(tmp_path: Path) -> None:
    fake = Fake(tmp_path, answered=True)
    await Interpreter(fake.ctx).run(doc(say("hi")))
    assert ("answer",) not in fake.ops


@pytest.mark.parametrize(("reason", "code"), [(None, 603), ("rejected", 603), ("busy", 486)])
async def test_reject_never_answers(fake: Fake, reason: str | None, code: int) -> None:
    params = {} if reason is None else {"reason": reason}
    result = await Interpreter(fake.ctx).run(doc({"reject": params}, say("never")))
    assert (result.ended_by, result.reject_code) == ("reject", code)
    assert fake.ops == [("reject", code)]


async def test_reject_after_answer_hangs_up_and_says_so(fake: Fake) -> None:
    result = await Interpreter(fake.ctx).run(doc(say("hi"), {"reject": {}}, say("never")))
    assert result.ended_by == "hangup_verb"
    assert result.reject_code is None
    assert [(e.code, e.path) for e in result.errors] == [
        ("reject_after_answer", "actions[1].reject")
    ]
    assert fake.said() == ["hi"]
    assert fake.ops[-1] == ("hangup",)
    assert not fake.kinds("reject")


async def test_document_end_hangs_up(fake: Fake) -> None:
    result = await Interpreter(fake.ctx).run(doc(say("a"), say("b")))
    assert result.ended_by == "document_end"
    assert result.documents == 1
    assert fake.said() == ["a", "b"]
    assert fake.ops[-1] == ("hangup",)


async def test_hangup_verb_drops_the_rest(fake: Fake) -> None:
    result = await Interpreter(fake.ctx).run(doc(say("a"), {"hangup": {}}, say("b")))
    assert result.ended_by == "hangup_verb"
    assert fake.said() == ["a"]


async def test_say_passes_voice_language_and_loops(fake: Fake) -> None:
    await Interpreter(fake.ctx).run(
        doc(say("Hello from Sautikit.", voice="alice", language="en-US", loop=3), say("x", loop=0))
    )
    assert fake.kinds("tts")[0] == ("tts", "Hello from Sautikit.", "alice", "en-US")
    assert fake.said() == ["Hello from Sautikit."] * 3 + ["x"]


async def test_play_resolves_relative_urls_against_the_document(fake: Fake) -> None:
    await Interpreter(fake.ctx).run(
        doc({"play": {"url": "/audio/hi.wav"}}, {"play": {"url": "bye.wav", "loop": 2}})
    )
    assert fake.kinds("audio") == [
        ("audio", "https://app.example/audio/hi.wav"),
        ("audio", "https://app.example/voice/bye.wav"),
    ]
    assert fake.said() == ["hi", "bye", "bye"]


async def test_pause_waits_its_length(fake: Fake) -> None:
    await Interpreter(fake.ctx).run(doc({"pause": {"length": 2.5}}, {"pause": {}}))
    assert fake.kinds("wait") == [("wait", 2.5), ("wait", 1)]


async def test_redirect_resolves_relative_url_and_replaces_the_rest(fake: Fake) -> None:
    fake.app.routes["https://app.example/ivr/menu"] = {
        "actions": [say("menu"), {"redirect": {"url": "options", "method": "GET"}}]
    }
    fake.app.routes["https://app.example/ivr/options"] = {"actions": [say("options")]}
    result = await Interpreter(fake.ctx).run(
        doc(say("welcome"), {"redirect": {"url": "/ivr/menu"}}, say("never"))
    )
    assert fake.said() == ["welcome", "menu", "options"]
    assert [op[1:3] for op in fake.kinds("fetch")] == [
        ("https://app.example/ivr/menu", "POST"),
        ("https://app.example/ivr/options", "GET"),  # relative to the menu document's URL
    ]
    assert (result.ended_by, result.documents) == ("document_end", 3)


async def test_redirect_to_an_absolute_url(fake: Fake) -> None:
    fake.app.routes["https://other.example/ivr"] = {"actions": [{"hangup": {}}]}
    result = await Interpreter(fake.ctx).run(
        doc({"redirect": {"url": "https://other.example/ivr"}})
    )
    assert result.ended_by == "hangup_verb"


async def test_redirect_loop_is_capped(fake: Fake) -> None:
    fake.app.routes[FIRST_URL] = {"actions": [{"redirect": {"url": FIRST_URL}}]}
    with pytest.raises(VoiceAppError) as info:
        # wait_for: without the cap this test would spin forever instead of failing
        await asyncio.wait_for(Interpreter(fake.ctx).run(doc({"redirect": {"url": FIRST_URL}})), 5)
    assert info.value.code == "redirect_loop"
    assert len(fake.kinds("fetch")) == MAX_REDIRECTS  # the 11th is never requested
    assert ("answer",) not in fake.ops


async def test_redirects_with_media_in_between_are_not_a_loop(fake: Fake) -> None:
    count = 0

    def next_doc() -> dict[str, Any]:
        nonlocal count
        count += 1
        if count > MAX_REDIRECTS + 5:
            return {"actions": [{"hangup": {}}]}
        return {"actions": [say(f"step {count}"), {"redirect": {"url": FIRST_URL}}]}

    fake.app.routes[FIRST_URL] = next_doc
    result = await Interpreter(fake.ctx).run(doc({"redirect": {"url": FIRST_URL}}))
    assert result.ended_by == "hangup_verb"
    assert count == MAX_REDIRECTS + 6


async def test_invalid_first_document_runs_nothing(fake: Fake) -> None:
    with pytest.raises(VoiceAppError) as info:
        await Interpreter(fake.ctx).run(doc(say("hi"), {"sayy": {}}, {"hangup": {"x": 1}}))
    assert info.value.code == "document_invalid"
    assert info.value.message == (
        "actions[1].sayy: unknown verb; did you mean say?; actions[2].hangup.x: unknown parameter"
    )
    assert fake.ops == []


async def test_invalid_replacement_document_raises(fake: Fake) -> None:
    fake.app.routes["https://app.example/voice/menu"] = {"actions": [{"say": {}}]}
    with pytest.raises(VoiceAppError) as info:
        await Interpreter(fake.ctx).run(doc(say("a"), {"redirect": {"url": "menu"}}))
    assert info.value.code == "document_invalid"
    assert "actions[0].say.text" in info.value.message
    assert fake.said() == ["a"]


async def test_fetch_failure_propagates(fake: Fake) -> None:
    with pytest.raises(VoiceAppError) as info:
        await Interpreter(fake.ctx).run(doc({"redirect": {"url": "/missing"}}))
    assert info.value.code == "callback_http_status"


async def test_caller_hangup_mid_say_stops_everything(fake: Fake) -> None:
    fake.leg.on_play = lambda wav: fake.leg.end() if wav.name == "a.wav" else None
    result = await Interpreter(fake.ctx).run(doc(say("a"), say("b"), {"hangup": {}}))
    assert result.ended_by == "caller"
    assert fake.said() == ["a"]
    assert not fake.kinds("hangup")


async def test_media_error_skips_the_verb_and_goes_on(fake: Fake) -> None:
    fake.prompts.failing = {"broken", "https://app.example/missing.wav"}
    result = await Interpreter(fake.ctx).run(
        doc(say("broken"), {"play": {"url": "/missing.wav"}}, say("fine"))
    )
    assert fake.said() == ["fine"]
    assert [(e.code, e.path) for e in result.errors] == [
        ("tts_failed", "actions[0].say"),
        ("media_fetch_failed", "actions[1].play"),
    ]
    assert result.ended_by == "document_end"


@pytest.mark.parametrize(
    "item",
    [
        {"dial": {"number": "+254711000000"}},
        {"conference": {"name": "room"}},
        {"stream": {"url": "wss://ai.example/audio"}},
    ],
)
async def test_unsupported_verbs_fail_the_call_naming_the_path(
    fake: Fake, item: dict[str, Any]
) -> None:
    # Never a silent success: the session turns this into call.failed verb_unsupported.
    verb = next(iter(item))
    with pytest.raises(VoiceAppError) as e:
        await Interpreter(fake.ctx).run(doc(say("a"), item, say("never")))
    assert e.value.code == "verb_unsupported"
    assert e.value.message == f"actions[1].{verb}: {verb} is not supported yet"
    assert fake.said() == ["a"]


async def test_an_empty_first_document_is_document_empty(fake: Fake) -> None:
    with pytest.raises(VoiceAppError) as e:
        await Interpreter(fake.ctx).run(FetchedDocument({"actions": []}, FIRST_URL))
    assert e.value.code == "document_empty"
    assert fake.ops == []


async def test_body_from_the_voice_app_may_be_raw_json_bytes(fake: Fake) -> None:
    first = FetchedDocument(b'{"actions": [{"say": {"text": "raw"}}]}', FIRST_URL)
    await Interpreter(fake.ctx).run(first)
    assert fake.said() == ["raw"]
