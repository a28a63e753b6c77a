"""getDigits: barge-in, finishOnKey, numDigits, timeouts, and the Digits POST that replaces."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dsl.interpreter import Interpreter
from tests.unit.test_dsl_fakes import CALLBACK_URL, Fake, doc, say


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    fake = Fake(tmp_path)
    fake.app.routes[CALLBACK_URL] = {"actions": [say("thanks")]}
    return fake


def digits_posted(fake: Fake) -> list[dict[str, str]]:
    return [op[3] for op in fake.kinds("fetch") if op[1:3] == (CALLBACK_URL, "POST")]


async def test_digits_are_posted_and_the_reply_replaces_the_rest(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["1", "2", "#"]
    result = await Interpreter(fake.ctx).run(doc({"getDigits": {}}, say("not reached")))
    assert digits_posted(fake) == [{"Digits": "12"}]
    assert fake.said() == ["thanks"]
    assert result.ended_by == "document_end"


async def test_listens_for_inband_digits_only_while_collecting(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["5", "#"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {}}))
    kinds = [op for op in fake.ops if op[0] in ("flush", "listen", "fetch")]
    assert [op[:2] for op in kinds] == [
        ("listen", True),
        ("listen", False),
        ("fetch", CALLBACK_URL),
    ]


async def test_type_ahead_keys_pressed_during_an_earlier_say_count(fake: Fake) -> None:
    # The SDK quickstart: "Press 1 ..." said, then getDigits; the caller presses 1 meanwhile.
    fake.leg.on_play = lambda _: (fake.leg.press("1"), setattr(fake.leg, "on_play", None))
    await Interpreter(fake.ctx).run(doc(say("Press 1 for sales"), {"getDigits": {"numDigits": 1}}))
    assert digits_posted(fake) == [{"Digits": "1"}]


async def test_flush_digits_extension_drops_type_ahead(fake: Fake) -> None:
    fake.leg.press("9")  # e.g. during an earlier say
    fake.leg.digits_on_listen = ["1", "#"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"flushDigits": True}}))
    assert digits_posted(fake) == [{"Digits": "1"}]


async def test_finish_on_key_ends_input_and_is_not_included(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["4", "2", "*", "7"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"finishOnKey": "*"}}))
    assert digits_posted(fake) == [{"Digits": "42"}]


async def test_empty_finish_on_key_means_hash_is_a_digit(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["4", "#"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"finishOnKey": "", "numDigits": 2}}))
    assert digits_posted(fake) == [{"Digits": "4#"}]


async def test_num_digits_stops_collecting(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["1", "2", "3", "4"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"numDigits": 3}}))
    assert digits_posted(fake) == [{"Digits": "123"}]
    assert fake.leg.queue.get_nowait() == "4"  # left for whatever comes next


async def test_timeout_without_digits_runs_the_next_action(fake: Fake) -> None:
    result = await Interpreter(fake.ctx).run(doc({"getDigits": {}}, say("no input")))
    assert not fake.kinds("fetch")
    assert fake.said() == ["no input"]
    assert fake.leg.next_digit_timeouts == [fake.ctx.default_digit_timeout_s]
    assert result.ended_by == "document_end"


async def test_finish_key_alone_is_no_input(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["#"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {}}, say("no input")))
    assert not fake.kinds("fetch")
    assert fake.said() == ["no input"]


async def test_timeout_after_some_digits_posts_them(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["7"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"timeout": 0.05}}))
    assert digits_posted(fake) == [{"Digits": "7"}]


async def test_timeout_and_inter_digit_timeout(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["1", "2"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"timeout": 0.2, "interDigitTimeout": 0.05}}))
    assert fake.leg.next_digit_timeouts == [0.2, 0.05, 0.05]
    assert digits_posted(fake) == [{"Digits": "12"}]


async def test_between_digits_the_timeout_applies_without_inter_digit_timeout(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["1"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"timeout": 0.07}}))
    assert fake.leg.next_digit_timeouts == [0.07, 0.07]


async def test_valid_digits_ignores_other_keys(fake: Fake) -> None:
    fake.leg.digits_on_listen = ["9", "1", "5", "2", "#"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"validDigits": "123"}}))
    assert digits_posted(fake) == [{"Digits": "12"}]


async def test_nested_prompts_play_then_the_timeout_starts(fake: Fake) -> None:
    nested = [{"say": {"text": "menu"}}, {"play": {"url": "/tone.wav"}}]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"nested": nested}}, say("next")))
    assert fake.said() == ["menu", "tone", "next"]
    assert ("played", "menu.wav") in fake.ops and ("played", "tone.wav") in fake.ops
    assert fake.kinds("audio") == [("audio", "https://app.example/tone.wav")]
    assert not fake.kinds("fetch")


async def test_first_digit_barges_in_and_counts(fake: Fake) -> None:
    fake.leg.play_seconds = 5  # a long prompt: only barge-in ends it in time
    fake.leg.on_play = lambda wav: fake.leg.press("3", "1") if wav.name == "menu.wav" else None
    nested = [{"say": {"text": "menu", "loop": 3}}, {"say": {"text": "more options"}}]
    run = Interpreter(fake.ctx).run(
        doc({"getDigits": {"numDigits": 2, "nested": nested}}, say("no"))
    )
    fake.app.routes[CALLBACK_URL] = {"actions": [{"hangup": {}}]}
    await asyncio.wait_for(run, 2)
    assert ("stopped", "menu.wav") in fake.ops
    assert fake.said() == ["menu"]  # neither its loops nor the next prompt play
    assert digits_posted(fake) == [{"Digits": "31"}]


async def test_media_error_in_a_nested_prompt_skips_only_that_prompt(fake: Fake) -> None:
    fake.prompts.failing = {"broken"}
    fake.leg.digits_on_listen = ["8", "#"]
    nested = [{"say": {"text": "broken"}}, {"say": {"text": "fine"}}]
    result = await Interpreter(fake.ctx).run(doc({"getDigits": {"nested": nested}}))
    assert [(e.code, e.path) for e in result.errors] == [
        ("tts_failed", "actions[0].getDigits.nested[0].say")
    ]
    assert digits_posted(fake) == [{"Digits": "8"}]


async def test_empty_reply_lets_the_document_go_on(fake: Fake) -> None:
    fake.app.routes[CALLBACK_URL] = {"actions": []}
    fake.leg.digits_on_listen = ["1", "#"]
    await Interpreter(fake.ctx).run(doc({"getDigits": {}}, say("carry on")))
    assert digits_posted(fake) == [{"Digits": "1"}]
    assert fake.said() == ["carry on"]


async def test_caller_hangup_while_waiting_stops_everything(fake: Fake) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, fake.leg.end)
    result = await Interpreter(fake.ctx).run(doc({"getDigits": {"timeout": 5}}, say("no")))
    assert result.ended_by == "caller"
    assert fake.said() == []
    assert ("listen", False) in fake.ops


async def test_caller_hangup_during_a_nested_prompt(fake: Fake) -> None:
    fake.leg.on_play = lambda wav: fake.leg.end()
    nested = [{"say": {"text": "menu"}}]
    result = await Interpreter(fake.ctx).run(doc({"getDigits": {"nested": nested}}, say("no")))
    assert result.ended_by == "caller"
    assert not fake.kinds("fetch")


async def test_timeout_counts_from_the_end_of_the_prompts(fake: Fake) -> None:
    # The prompt plays 0.2 s; the key comes at 0.3 s: inside a 0.25 s timeout only if that
    # timeout started when the prompt ended.
    loop = asyncio.get_running_loop()
    fake.leg.play_seconds = 0.2
    fake.leg.on_play = lambda wav: loop.call_later(0.3, fake.leg.press, "5", "#")
    nested = [{"say": {"text": "menu"}}]
    await Interpreter(fake.ctx).run(doc({"getDigits": {"timeout": 0.25, "nested": nested}}))
    assert ("played", "menu.wav") in fake.ops
    assert digits_posted(fake) == [{"Digits": "5"}]
