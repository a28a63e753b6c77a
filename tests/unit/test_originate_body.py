"""The create body (`POST /v1/calls`): what becomes OutboundCalls, and every refusal naming its
field."""

from __future__ import annotations

from typing import Any

import pytest

from config.settings import Settings
from gateway.api.originate import BodyError, parse_create

SETTINGS = Settings.model_validate(
    {
        "api": {"token": "t" * 16},
        "control_plane": {"control_url": "https://cp.example/control", "secret": "s" * 16},
        "outbound": {"ring_timeout_s": 25},
    }
)
NO_MCP = Settings.model_validate({"api": {"token": "t" * 16}, "callbacks": {"allow_http": True}})
BASE = {"from": "+254700000001", "to": "+254722000001", "voice_callback_url": "https://a.example/v"}


def issues(body: dict[str, Any], settings: Settings = SETTINGS) -> list[tuple[str, str]]:
    with pytest.raises(BodyError) as err:
        parse_create(body, settings)
    return [(i.path, i.message) for i in err.value.issues]


def paths(body: dict[str, Any], settings: Settings = SETTINGS) -> list[str]:
    return [p for p, _ in issues(body, settings)]


def test_quickstart_body() -> None:
    plan = parse_create(dict(BASE), SETTINGS)
    assert not plan.to_is_list and plan.ignored_fields == []
    (call,) = plan.calls
    assert (call.from_, call.to, call.voice_callback_url) == (
        "+254700000001",
        "+254722000001",
        "https://a.example/v",
    )
    assert call.timeout_s == 25  # settings.outbound.ring_timeout_s
    assert len(call.call_id) == 36 and call.control is None and call.control_timeout_ms is None


def test_sdk_body_with_list_and_national_forms() -> None:
    body = {
        "from": "0700000001",
        "to": ["0722000001", "+254 733-000-002", "254744000003"],
        "caller_id": "+254700000009",
        "client_request_id": "order-42:attempt/1",
        "control": "mcp",
        "hold_audio_url": "https://a.example/hold.wav",
        "opening_actions": [{"say": {"text": "Hello"}}],
        "fallback_actions": [{"hangup": {}}],
        "session_id": "sess_1",
        "timeout": 40,
        "time_limit": 600,
        "events_url": "https://cp.example/events",
        "webhook_secret": "whsec_123",
        "metadata": {"x": 1},
        "future_sdk_field": True,
    }
    plan = parse_create(body, SETTINGS)
    assert plan.to_is_list
    assert plan.ignored_fields == ["future_sdk_field", "metadata"]
    assert [c.to for c in plan.calls] == ["+254722000001", "+254733000002", "+254744000003"]
    assert len({c.call_id for c in plan.calls}) == 3
    c = plan.calls[0]
    assert c.from_ == "+254700000001" and c.caller_id == "+254700000009"
    assert c.control == "mcp" and c.control_timeout_ms == 10000
    assert c.opening_actions == [{"say": {"text": "Hello"}}]
    assert (c.timeout_s, c.time_limit_s, c.session_id) == (40, 600, "sess_1")
    assert c.webhook_secret == "whsec_123" and "whsec_123" not in repr(c)
    assert c.client_request_id == "order-42:attempt/1"


def test_call_id_kept_for_one_destination_refused_for_many() -> None:
    assert parse_create(BASE | {"call_id": "cp-call-1"}, SETTINGS).calls[0].call_id == "cp-call-1"
    one = parse_create(BASE | {"to": ["+254722000001"], "call_id": "cp-1"}, SETTINGS)
    assert one.to_is_list and one.calls[0].call_id == "cp-1"
    assert paths(BASE | {"to": ["+254722000001", "+254722000002"], "call_id": "x"}) == ["call_id"]
    assert paths(BASE | {"call_id": "../etc"}) == ["call_id"]


def test_to_errors_name_the_item() -> None:
    assert paths(BASE | {"to": ["+254722000001", "hello", 254722000003]}) == ["to[1]", "to[2]"]
    assert paths(BASE | {"to": "12"}) == ["to"]
    assert paths(BASE | {"to": []}) == ["to"]
    assert paths(BASE | {"to": [f"+2547220{i:05d}" for i in range(51)]}) == ["to"]
    dup = issues(BASE | {"to": ["+254722000001", "0722000001"]})
    assert dup == [("to[1]", "+254722000001 is already to[0]")]
    assert paths({"to": "+254722000001"}) == ["from"]
    assert paths({"from": "+254700000001"}) == ["to"]
    assert paths(BASE | {"from": "nope", "caller_id": "x"}) == ["from", "caller_id"]


@pytest.mark.parametrize(
    "value",
    [
        "has space",
        "tab\there",
        "a,b",
        "{x}",
        'say"hi"',
        "it's",
        "ctl\x01",
        "nbsp\u00a0x",
        "mcp:abc",
        "broadcast:xyz",
        "x" * 5001,
        "",
    ],
)
def test_client_request_id_refused(value: str) -> None:
    (found,) = issues(BASE | {"client_request_id": value})
    assert found[0] == "client_request_id"


@pytest.mark.parametrize("value", ["x" * 5000, "MCP:upper-is-fine", "a/b=c;d&e|f", "ñandú-✓"])
def test_client_request_id_accepted(value: str) -> None:
    assert parse_create(BASE | {"client_request_id": value}, SETTINGS).calls[0].client_request_id


def test_documents_validated_with_json_paths() -> None:
    got = issues(
        {
            "from": "+254700000001",
            "to": "+254722000001",
            "actions": [{"say": {"text": 5}}, {"hangup": {}}, {"play": {}}],
        }
    )
    assert got == [
        ("actions[0].say.text", "expected a string"),
        ("actions[2].play.url", "required parameter missing"),
    ]
    mcp = issues(
        BASE | {"control": "mcp", "opening_actions": [{"sya": {}}], "fallback_actions": "hangup"}
    )
    assert mcp[0][0] == "opening_actions[0].sya" and "did you mean say" in mcp[0][1]
    assert mcp[1][0] == "fallback_actions"
    assert paths(BASE | {"actions": [{"hangup": {}}]}) == ["actions"]  # not both


def test_urls_shape_only() -> None:
    assert paths(BASE | {"voice_callback_url": "ftp://a/b"}) == ["voice_callback_url"]
    assert paths(BASE | {"voice_callback_url": "https://u:p@a/b"}) == ["voice_callback_url"]
    assert paths(BASE | {"events_url": "/relative"}) == ["events_url"]
    assert paths(BASE | {"voice_callback_url": "http://a.example/v"}) == ["voice_callback_url"]
    # http:// allowed by config; private addresses are refused at fetch time, not here
    assert parse_create(BASE | {"voice_callback_url": "http://127.0.0.1:9/v"}, NO_MCP).calls


def test_mcp_fields_need_control_mcp() -> None:
    got = paths(BASE | {"hold_audio_url": "https://a/h.wav", "control_timeout_ms": 5000})
    assert got == ["hold_audio_url", "control_timeout_ms"]
    assert paths(BASE | {"control": "mcp"}, NO_MCP) == ["control"]
    assert paths(BASE | {"control": "ivr"}) == ["control"]
    assert paths(BASE | {"control": "mcp", "control_timeout_ms": 10}) == ["control_timeout_ms"]


def test_types_and_bounds() -> None:
    assert paths(BASE | {"timeout": 0}) == ["timeout"]
    assert paths(BASE | {"timeout": "soon"}) == ["timeout"]
    assert paths(BASE | {"time_limit": 10**6}) == ["time_limit"]
    assert paths(BASE | {"voice_callback_method": "PUT"}) == ["voice_callback_method"]
    assert paths(BASE | {"webhook_secret": ""}) == ["webhook_secret"]
    with pytest.raises(BodyError):
        parse_create(["not", "an", "object"], SETTINGS)
