"""Document validation: the SDK's shapes pass, every error names its path, code and fix."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dsl.document import MAX_ACTIONS, MAX_BYTES, parse_document
from dsl.errors import DocIssue, DocumentError
from dsl.verbs import (
    Conference,
    Dial,
    GetDigits,
    Hangup,
    Pause,
    Play,
    Record,
    Redirect,
    Reject,
    Say,
    Stream,
)

# Shapes a voice app written with @sautikit/node sends (anchors.md), one per verb and variant.
SDK_SHAPES: list[tuple[dict[str, Any], type]] = [
    ({"say": {"text": "Hello from Sautikit.", "voice": "alice", "language": "en-US"}}, Say),
    ({"say": {"text": "Karibu.", "voice": "woman", "language": "sw-KE", "loop": 0}}, Say),
    ({"say": {"text": "Welcome.", "language": "en-KE", "loop": 2}}, Say),
    ({"play": {"url": "https://cdn.example/hold.mp3", "loop": 0}}, Play),
    ({"play": {"url": "/audio/welcome.wav"}}, Play),
    (
        {
            "getDigits": {
                "timeout": 10,
                "numDigits": 4,
                "finishOnKey": "#",
                "nested": [
                    {"say": {"text": "Enter your PIN."}},
                    {"play": {"url": "https://cdn.example/beep.wav"}},
                ],
            }
        },
        GetDigits,
    ),
    ({"getDigits": {"numDigits": 1, "finishOnKey": ""}}, GetDigits),
    (
        {
            "record": {
                "action": "https://app.example/voice/recorded",
                "method": "POST",
                "timeout": 5,
                "maxLength": 60,
                "finishOnKey": "#",
                "transcribe": True,
                "transcribeCallback": "https://app.example/transcripts",
            }
        },
        Record,
    ),
    (
        {
            "dial": {
                "number": "+254711000000",
                "callerId": "+254700000000",
                "timeout": 20,
                "record": "record-from-answer",
            }
        },
        Dial,
    ),
    ({"dial": {"numbers": ["+254711000000", "+254722000000"]}}, Dial),
    ({"dial": {"sip": "sip:agent@pbx.example", "record": "record-from-ringing"}}, Dial),
    (
        {
            "conference": {
                "name": "standup",
                "flags": "moderator",
                "maxParticipants": 10,
                "record": True,
                "beep": False,
                "muted": False,
                "startOnEnter": True,
                "endOnExit": True,
                "waitUrl": "https://cdn.example/wait.mp3",
                "statusEventsCallbackUrl": "https://app.example/conf",
                "statusEvents": "start end join leave",
                "collectDigits": True,
                "finishOnKey": "*",
                "numDigits": 2,
                "digitsCallbackUrl": "https://app.example/conf/digits",
            }
        },
        Conference,
    ),
    ({"redirect": {"url": "/voice/menu"}}, Redirect),
    ({"redirect": {"url": "https://app.example/voice/next", "method": "GET"}}, Redirect),
    ({"reject": {}}, Reject),
    ({"reject": {"reason": "busy"}}, Reject),
    ({"hangup": {}}, Hangup),
    (
        {
            "stream": {
                "url": "wss://ai.example/audio",
                "track": "both_tracks",
                "connect": True,
                "outputSamplingRate": 16000,
                "bidirectionalSamplingRate": 8000,
                "name": "agent",
                "inputSamplingRate": 8000,
                "headerMetadata": json.dumps({"customer": "42"}),
                "openMetadata": "hello",
                "statusCallback": "https://app.example/stream",
                "statusEvents": "stream-started stream-stopped stream-error",
            }
        },
        Stream,
    ),
    ({"pause": {"length": 2}}, Pause),
]


def issues_of(body: Any) -> list[DocIssue]:
    with pytest.raises(DocumentError) as info:
        parse_document(body)
    return info.value.errors


def one_issue(body: Any) -> DocIssue:
    errors = issues_of(body)
    assert len(errors) == 1, errors
    return errors[0]


def actions(*items: Any) -> dict[str, Any]:
    return {"actions": list(items)}


@pytest.mark.parametrize(
    ("item", "cls"), SDK_SHAPES, ids=lambda x: next(iter(x)) if isinstance(x, dict) else ""
)
def test_sdk_shapes_are_valid(item: dict[str, Any], cls: type) -> None:
    document = parse_document(json.dumps(actions(item)))
    assert len(document.actions) == 1
    assert type(document.actions[0]) is cls


def test_a_whole_sdk_app_parses_from_bytes_in_order() -> None:
    raw = json.dumps(actions(*(item for item, _ in SDK_SHAPES))).encode()
    document = parse_document(raw)
    assert [type(v) for v in document.actions] == [cls for _, cls in SDK_SHAPES]


def test_defaults_live_in_the_models() -> None:
    gd = parse_document(actions({"getDigits": {}})).actions[0]
    assert isinstance(gd, GetDigits)
    assert (gd.finish_on_key, gd.num_digits, gd.timeout, gd.nested) == ("#", 0, 0, [])
    rec = parse_document(actions({"record": {}})).actions[0]
    assert isinstance(rec, Record)
    assert (rec.action, rec.method, rec.timeout, rec.max_length) == (None, "POST", 5, 3600)
    assert (rec.finish_on_key, rec.play_beep, rec.format) == ("", True, "wav")  # SDK: none
    conf = parse_document(actions({"conference": {"name": "x"}})).actions[0]
    assert isinstance(conf, Conference) and conf.start_on_enter is True
    dial = parse_document(actions({"dial": {"number": "+254711000000"}})).actions[0]
    assert isinstance(dial, Dial) and dial.timeout == 30
    red = parse_document(actions({"redirect": {"url": "/x"}})).actions[0]
    assert isinstance(red, Redirect) and red.method == "POST"
    say = parse_document(actions({"say": {"text": "hi"}})).actions[0]
    assert isinstance(say, Say) and say.loop == 1


@pytest.mark.parametrize(("reason", "code"), [(None, 603), ("rejected", 603), ("busy", 486)])
def test_reject_reason_maps_to_sip_code(reason: str | None, code: int) -> None:
    params = {} if reason is None else {"reason": reason}
    verb = parse_document(actions({"reject": params})).actions[0]
    assert isinstance(verb, Reject) and verb.sip_code == code


def test_empty_document_is_valid() -> None:
    assert parse_document('{"actions": []}').actions == ()


# --- limits -------------------------------------------------------------------------------


def test_fifty_actions_pass_fifty_one_fail() -> None:
    assert len(parse_document(actions(*[{"hangup": {}}] * MAX_ACTIONS)).actions) == 50
    issue = one_issue(actions(*[{"hangup": {}}] * (MAX_ACTIONS + 1)))
    assert (issue.path, issue.code) == ("actions", "document.too_many_actions")
    assert "51 actions" in issue.message and "50" in issue.message


def _padded(size: int) -> bytes:
    raw = json.dumps(actions({"hangup": {}})).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_64_kib_limit_on_bytes_and_str() -> None:
    at_limit = _padded(MAX_BYTES)
    assert len(at_limit) == 65536
    parse_document(at_limit)
    parse_document(at_limit.decode())
    over = _padded(MAX_BYTES + 1)
    issue = one_issue(over)
    assert (issue.path, issue.code) == ("", "document.too_large")
    assert "65537" in issue.message
    assert one_issue(over.decode()).code == "document.too_large"


def test_64_kib_limit_on_parsed_json() -> None:
    big = actions(*[{"say": {"text": "x" * 3000}}] * 22)  # ~66 KB once serialised
    assert one_issue(big).code == "document.too_large"


# --- every error code, its path and its suggestion ------------------------------------------


def test_unknown_parameter_names_path_and_nearest() -> None:
    issue = one_issue(
        actions({"say": {"text": "hi"}}, {"getDigits": {"finishOnkey": "#", "numDigits": 1}})
    )
    assert (
        str(issue)
        == "actions[1].getDigits.finishOnkey: unknown parameter; did you mean finishOnKey?"
    )
    assert issue.code == "param.unknown"


def test_snake_case_parameter_suggests_camel_case() -> None:
    issue = one_issue(actions({"record": {"finish_on_key": "#"}}))
    assert (
        str(issue)
        == "actions[0].record.finish_on_key: unknown parameter; did you mean finishOnKey?"
    )


def test_unknown_parameter_without_a_near_name_has_no_suggestion() -> None:
    issue = one_issue(actions({"hangup": {"zzzz": 1}}))
    assert str(issue) == "actions[0].hangup.zzzz: unknown parameter"


def test_unknown_verb_suggests_nearest() -> None:
    issue = one_issue(actions({"sayy": {"text": "hi"}}))
    assert str(issue) == "actions[0].sayy: unknown verb; did you mean say?"
    assert issue.code == "action.unknown_verb"
    assert str(one_issue(actions({"get_digits": {}}))).endswith("did you mean getDigits?")


def test_two_verbs_in_one_item() -> None:
    issue = one_issue(actions({"say": {"text": "a"}, "play": {"url": "/b.wav"}}))
    assert (issue.path, issue.code) == ("actions[0]", "action.one_verb")
    assert "say, play" in issue.message


@pytest.mark.parametrize("item", ["say", 3, None, ["say"], {}])
def test_item_that_is_not_one_verb_object(item: Any) -> None:
    issue = one_issue(actions({"hangup": {}}, item))
    assert (issue.path, issue.code) == ("actions[1]", "action.one_verb")


@pytest.mark.parametrize("body", [[{"say": {"text": "x"}}], '"just text"', 42, None])
def test_document_not_object(body: Any) -> None:
    issue = one_issue(body)
    assert (issue.path, issue.code) == ("", "document.not_object")


def test_not_json() -> None:
    assert one_issue(b'{"actions": [').code == "document.not_json"
    assert one_issue(b"\xff\xfe").code == "document.not_json"


def test_envelope_errors() -> None:
    issues = issues_of({"action": []})
    assert [(i.path, i.code) for i in issues] == [
        ("action", "param.unknown"),
        ("actions", "param.required"),
    ]
    assert issues[0].message.endswith("did you mean actions?")
    issue = one_issue({"actions": {"say": {"text": "x"}}})
    assert (str(issue), issue.code) == ("actions: expected a list", "param.invalid")


@pytest.mark.parametrize("loop", ["2", 1.5, True])
def test_wrong_type_says_what_was_expected(loop: Any) -> None:
    issue = one_issue(actions({"say": {"text": "hi", "loop": loop}}))
    assert str(issue) == "actions[0].say.loop: expected an integer"
    assert issue.code == "param.invalid"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"record": {"playBeep": "true"}}, "actions[0].record.playBeep: expected true or false"),
        ({"getDigits": {"timeout": "10"}}, "actions[0].getDigits.timeout: expected a number"),
        ({"say": {"text": 5}}, "actions[0].say.text: expected a string"),
        ({"say": {"text": "x", "loop": -1}}, "actions[0].say.loop: must be at least 0"),
        (
            {"reject": {"reason": "nope"}},
            'actions[0].reject.reason: expected "rejected" or "busy"',
        ),
        (
            {"getDigits": {"finishOnKey": "##"}},
            'actions[0].getDigits.finishOnKey: expected one key: 0-9, * or #, or "" for none',
        ),
        (
            {"say": {"text": "x", "language": "en_KE!"}},
            "actions[0].say.language: expected a BCP-47 language tag like en-KE",
        ),
        (
            {"dial": {"numbers": ["+254711000000", "0711"]}},
            "actions[0].dial.numbers[1]: expected a phone number like +254711000000 or"
            " 0711000000 (too short for KE)",
        ),
        (
            {"stream": {"url": "https://x.example"}},
            "actions[0].stream.url: invalid format",
        ),
        (
            {"stream": {"url": "wss://x.example", "outputSamplingRate": 768000}},
            "actions[0].stream.outputSamplingRate: must be at most 384000",
        ),
        (
            {"conference": {"name": "c", "flags": 5}},
            "actions[0].conference.flags: expected a string or a list",
        ),
        (
            {"conference": {"name": "c", "statusEvents": "start finish"}},
            "actions[0].conference.statusEvents: "
            'expected a space-separated subset of "start end join leave"',
        ),
        (
            {"hangup": None},
            "actions[0].hangup: expected an object of parameters (e.g. {}), got null",
        ),
    ],
)
def test_invalid_values(item: dict[str, Any], expected: str) -> None:
    issue = one_issue(actions(item))
    assert str(issue) == expected
    assert issue.code == "param.invalid"


def test_missing_required_parameter() -> None:
    issue = one_issue(actions({"say": {"voice": "alice"}}))
    assert (str(issue), issue.code) == (
        "actions[0].say.text: required parameter missing",
        "param.required",
    )
    assert one_issue(actions({"redirect": {}})).path == "actions[0].redirect.url"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({}, "ErrDialTargetXOR"),
        ({"number": "+254711000000", "sip": "sip:a@b.example"}, "ErrDialTargetXOR"),
        ({"numbers": ["+254711000000"], "sip": "sip:a@b.example"}, "ErrDialTargetXOR"),
        ({"number": "+254711000000", "numbers": ["+254722000000"]}, "ErrDialNumberNumbers"),
    ],
)
def test_dial_target_rules_keep_the_sdk_codes(params: dict[str, Any], code: str) -> None:
    issue = one_issue(actions({"hangup": {}}, {"dial": {"callerId": "+254700000000", **params}}))
    assert (issue.path, issue.code) == ("actions[1].dial", code)


def test_get_digits_nested_only_say_and_play() -> None:
    issue = one_issue(actions({"getDigits": {"nested": [{"say": {"text": "x"}}, {"record": {}}]}}))
    assert (issue.path, issue.code) == ("actions[0].getDigits.nested[1].record", "getDigits.nested")
    assert issue.message == "only say or play may be nested in getDigits"


def test_get_digits_nested_errors_have_full_paths() -> None:
    issues = issues_of(
        actions(
            {
                "getDigits": {
                    "numDigits": "4",
                    "nested": [{"sayy": {"text": "x"}}, {"say": {"txt": "x"}}, "play"],
                }
            }
        )
    )
    assert [str(i) for i in issues] == [
        "actions[0].getDigits.numDigits: expected an integer",
        "actions[0].getDigits.nested[0].sayy: unknown verb; did you mean say?",
        "actions[0].getDigits.nested[1].say.text: required parameter missing",
        "actions[0].getDigits.nested[1].say.txt: unknown parameter; did you mean text?",
        "actions[0].getDigits.nested[2]: expected an object with exactly one verb, "
        'e.g. {"say": {...}}; got a string',
    ]


def test_every_problem_is_reported_at_once_in_order() -> None:
    issues = issues_of(
        actions(
            {"say": {"text": "ok"}},
            {"sayy": {}},
            {"play": {"url": "/a.wav", "lop": 2}},
            {"dial": {}},
        )
    )
    assert [(i.path, i.code) for i in issues] == [
        ("actions[1].sayy", "action.unknown_verb"),
        ("actions[2].play.lop", "param.unknown"),
        ("actions[3].dial", "ErrDialTargetXOR"),
    ]
    assert "did you mean loop?" in issues[1].message


def test_document_error_message_joins_every_issue() -> None:
    with pytest.raises(DocumentError) as info:
        parse_document(actions({"sayy": {}}, {"hangup": {"x": 1}}))
    assert str(info.value) == (
        "actions[0].sayy: unknown verb; did you mean say?; actions[1].hangup.x: unknown parameter"
    )
