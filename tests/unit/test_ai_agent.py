"""`aiAgent` against a fake call, fake Streams and a fake Dialer: the stream to the agent
runtime, each handover target, each onUnavailable value, and the edges (no runtime, no
dialer, destinations that cannot be dialled, the caller hanging up)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from dsl.context import (
    AgentRuntime,
    DialRequest,
    DialResult,
    DialTarget,
    MediaError,
    StreamEnd,
    StreamRequest,
    VoiceAppError,
)
from dsl.interpreter import MAX_AI_AGENTS, Interpreter, RunResult
from dsl.phone import set_default_region
from dsl.verbs.ai_agent import DEFAULT_GREETING, DEFAULT_GREETING_NO_BEEP, VOICEMAIL_MAX_LENGTH_S
from tests.unit.test_dial_verb import FakeDialer
from tests.unit.test_dsl_fakes import CALLBACK_URL, FIRST_URL, Fake, doc, say
from tests.unit.test_dsl_stream import FakeStreams, live_fake

AGENT = AgentRuntime("wss://agents.internal/v1/stream", 16000)
HANDOVER_URL = "https://app.example/agent/handover"
HANDED_OVER = StreamEnd("handover", handover={"summary": "wants sales"}, connected=True)


@pytest.fixture(autouse=True)
def _kenya() -> None:
    set_default_region("KE")


def agent(**params: Any) -> dict[str, Any]:
    return {"aiAgent": {"agentId": "ag_1", **params}}


def setup(
    tmp: Path, *, ends: list[StreamEnd | None], runtime: AgentRuntime | None = AGENT,
    dial: DialResult | None = None,
) -> tuple[Fake, FakeStreams, FakeDialer]:
    fake, streams = live_fake(tmp, runtime)
    streams.ends = list(ends)
    dialer = FakeDialer(dial)
    fake.ctx.dialer = dialer
    fake.app.routes[CALLBACK_URL] = {}  # the recording's callback: carry on
    return fake, streams, dialer


async def run(fake: Fake, *actions: dict[str, Any]) -> RunResult:
    return await asyncio.wait_for(Interpreter(fake.ctx).run(doc(*actions)), 5)


def records(fake: Fake) -> list[tuple[float, bool]]:
    """(maxLength, beep) of each recording taken."""
    return [(op[2], op[5]) for op in fake.kinds("record")]


def codes(result: RunResult) -> list[str]:
    return [e.code for e in result.errors]


# -- the stream to the agent runtime --------------------------------------------------------


async def test_the_agent_stream_request(tmp_path: Path) -> None:
    fake, streams, _ = setup(tmp_path, ends=[StreamEnd("closed", connected=True)])
    variables = {"customer": "Amina", "tier": "gold"}
    result = await run(fake, agent(revision=3, variables=variables))
    assert streams.requests == [StreamRequest(
        url=AGENT.url, track="inbound_track", connect=True, output_rate=16000,
        playback_rate=16000, name="ai-agent",
        metadata={"agentId": "ag_1", "revision": 3, "variables": variables},
        purpose="ai_agent",
    )]
    # No handover: the document ends, the call is hung up.
    assert result.ended_by == "document_end" and fake.kinds("hangup") and not result.errors
    assert streams.requests[0].status_events == frozenset()


async def test_default_metadata(tmp_path: Path) -> None:
    fake, streams, _ = setup(tmp_path, ends=[StreamEnd("closed", connected=True)])
    await run(fake, agent())
    assert streams.requests[0].metadata == {"agentId": "ag_1", "revision": None, "variables": {}}


async def test_without_streams_it_is_unsupported(tmp_path: Path) -> None:
    fake = Fake(tmp_path)
    with pytest.raises(VoiceAppError) as e:
        await run(fake, agent())
    assert e.value.code == "verb_unsupported"


async def test_the_caller_hanging_up_ends_the_run_and_the_agent_stream(tmp_path: Path) -> None:
    fake, streams, _ = setup(tmp_path, ends=[None])
    fake.app.routes[HANDOVER_URL] = {"actions": [say("never")]}
    task = asyncio.ensure_future(run(fake, agent(handover={"callbackUrl": HANDOVER_URL})))
    for _ in range(100):
        if streams.forks:
            break
        await asyncio.sleep(0.01)
    fake.leg.end()
    result = await task
    assert result.ended_by == "caller" and streams.forks[0].ended.done()
    assert not [op for op in fake.kinds("fetch") if op[1] == HANDOVER_URL]


async def test_a_fork_stopped_by_the_calls_end_is_the_callers_hangup_not_a_handover(
    tmp_path: Path,
) -> None:
    fake, streams, _ = setup(tmp_path, ends=[None])
    fake.app.routes[HANDOVER_URL] = {"actions": [say("never")]}
    task = asyncio.ensure_future(run(fake, agent(handover={"callbackUrl": HANDOVER_URL})))
    for _ in range(100):
        if streams.forks:
            break
        await asyncio.sleep(0.01)
    fake.leg.end()  # the gateway closes the call's forks as the call ends: same moment
    streams.forks[0].finish(StreamEnd("stopped", connected=True))
    result = await task
    assert result.ended_by == "caller" and not fake.kinds("fetch")


# -- handover -------------------------------------------------------------------------------


async def test_prologue_then_handover_to_a_callback_url_replaces_the_document(
    tmp_path: Path,
) -> None:
    fake, _, _ = setup(tmp_path, ends=[HANDED_OVER])
    fake.app.routes[HANDOVER_URL] = {"actions": [say("back from the agent")]}
    result = await run(fake, say("hello"), {"play": {"url": "/jingle.wav"}},
                       agent(handover={"callbackUrl": "/agent/handover"}))
    assert fake.said() == ["hello", "jingle", "back from the agent"]
    assert fake.ops.index(("played", "jingle.wav")) < fake.ops.index(("stream_open", AGENT.url))
    fetch = next(op for op in fake.kinds("fetch") if op[1] == HANDOVER_URL)
    assert fetch[2:] == ("POST", {
        "AgentId": "ag_1", "AgentHandover": "true", "HandoverReason": "handover",
        "HandoverData": json.dumps({"summary": "wants sales"})})
    assert result.ended_by == "document_end" and result.documents == 2


@pytest.mark.parametrize(
    "ended",
    [StreamEnd("disconnect", connected=True), StreamEnd("closed", close_code=1000,
                                                        connected=True),
     StreamEnd("dropped", "lost", connected=True), StreamEnd("stopped", connected=True)],
)
async def test_every_end_after_the_agent_ran_hands_over(tmp_path: Path, ended: StreamEnd) -> None:
    fake, _, _ = setup(tmp_path, ends=[ended])
    fake.app.routes[HANDOVER_URL] = {}
    result = await run(fake, agent(handover={"callbackUrl": HANDOVER_URL}))
    fetch = next(op for op in fake.kinds("fetch") if op[1] == HANDOVER_URL)
    assert fetch[3]["HandoverReason"] == ended.reason and fetch[3]["HandoverData"] == "{}"
    assert result.ended_by == "document_end" and "ai_agent_unavailable" not in codes(result)


async def test_handover_forward_builds_the_dial_request(tmp_path: Path) -> None:
    fake, _, dialer = setup(tmp_path, ends=[HANDED_OVER])
    forward = {"destinations": ["0712345678", "client:alice", "1234", "+254711000001"],
               "sequential": True, "firstAnswerWins": True, "ringTimeout": 20,
               "callerId": "+254700000009",
               "voicemail": {"greetingText": "nobody"}}
    result = await run(fake, agent(handover={"forward": forward}))
    assert dialer.requests == [DialRequest(
        targets=(DialTarget("number", "+254712345678"), DialTarget("client", "alice"),
                 DialTarget("number", "+254711000001")),
        sequential=True, caller_id="+254700000009", timeout_s=20,
    )]
    assert codes(result) == ["forward_destination_unsupported"]
    assert "1234" in result.errors[0].message
    assert fake.ctx.params["DialCallStatus"] == "completed"
    assert not fake.kinds("record") and fake.said() == []  # answered: no voicemail
    assert result.ended_by == "document_end"


async def test_handover_forward_defaults(tmp_path: Path) -> None:
    fake, _, dialer = setup(tmp_path, ends=[HANDED_OVER])
    await run(fake, agent(handover={"forward": {"destinations": ["+254711000001"]}}))
    assert dialer.requests == [DialRequest(targets=(DialTarget("number", "+254711000001"),))]


async def test_handover_forward_takes_its_voicemail_when_nobody_answers(tmp_path: Path) -> None:
    fake, _, dialer = setup(tmp_path, ends=[HANDED_OVER],
                            dial=DialResult("no-answer", "leg-2", 0, 487))
    forward = {"destinations": ["+254711000001"],
               "voicemail": {"greetingText": "Leave a message", "greetingVoice": "woman",
                             "maxLength": 30, "beep": False}}
    result = await run(fake, agent(handover={"forward": forward}))
    assert len(dialer.requests) == 1
    assert ("tts", "Leave a message", "woman", None) in fake.ops
    assert fake.said() == ["Leave a message"] and records(fake) == [(30, False)]
    assert fake.kinds("recording_ready")
    callback = next(op for op in fake.kinds("fetch") if op[1] == CALLBACK_URL)
    assert "RecordingUrl" in callback[3]
    assert result.ended_by == "document_end"


async def test_handover_forward_unanswered_without_voicemail_ends(tmp_path: Path) -> None:
    fake, _, _ = setup(tmp_path, ends=[HANDED_OVER], dial=DialResult("busy", "leg-2", 0, 486))
    result = await run(fake, agent(handover={"forward": {"destinations": ["+254711000001"]}}))
    assert result.ended_by == "document_end" and not fake.kinds("record")
    assert fake.ctx.params["DialCallStatus"] == "busy"


async def test_forward_to_only_undialable_destinations(tmp_path: Path) -> None:
    fake, _, dialer = setup(tmp_path, ends=[HANDED_OVER])
    forward: dict[str, Any] = {"destinations": ["client:not a name", "1001"]}
    with pytest.raises(VoiceAppError) as e:
        await run(fake, agent(handover={"forward": forward}))
    assert e.value.code == "forward_unavailable" and "1001" in e.value.message
    assert not dialer.requests
    # With a voicemail, the message is taken instead.
    fake, _, dialer = setup(tmp_path, ends=[HANDED_OVER])
    forward["voicemail"] = {}
    await run(fake, agent(handover={"forward": forward}))
    assert not dialer.requests and fake.said() == [DEFAULT_GREETING]
    assert records(fake) == [(VOICEMAIL_MAX_LENGTH_S, True)]


async def test_clients_and_numbers_ring_together(tmp_path: Path) -> None:
    fake, _, dialer = setup(tmp_path, ends=[HANDED_OVER])
    await run(fake, agent(handover={"forward": {
        "destinations": ["client:alice", "+254711000001", "client:alice"], "ringTimeout": 12}}))
    req = dialer.requests[0]
    assert [(t.kind, t.value) for t in req.targets] == [("client", "alice"),
                                                        ("number", "+254711000001")]
    assert req.timeout_s == 12 and not req.sequential


async def test_an_invalid_destination_is_noted_and_skipped(tmp_path: Path) -> None:
    fake, _, dialer = setup(tmp_path, ends=[HANDED_OVER])
    result = await run(fake, agent(handover={"forward": {
        "destinations": ["07123", "+254711000001"]}}))
    assert [t.value for t in dialer.requests[0].targets] == ["+254711000001"]
    assert codes(result) == ["forward_destination_invalid"]


async def test_forward_without_a_dialer_fails_the_call_clearly(tmp_path: Path) -> None:
    fake, _, _ = setup(tmp_path, ends=[HANDED_OVER])
    fake.ctx.dialer = None
    with pytest.raises(VoiceAppError) as e:
        await run(fake, agent(handover={"forward": {"destinations": ["+254711000001"]}}))
    assert e.value.code == "verb_unsupported"
    assert e.value.message == "actions[0].aiAgent: dial (aiAgent forward) is not supported yet"
    assert not fake.kinds("hangup")  # the session fails the call: never a silent hangup


async def test_handover_voicemail_says_the_greeting_and_records(tmp_path: Path) -> None:
    fake, _, _ = setup(tmp_path, ends=[HANDED_OVER])
    vm = {"greetingText": "Sorry we missed you", "greetingVoice": "man", "maxLength": 60}
    result = await run(fake, agent(handover={"voicemail": vm}))
    assert ("tts", "Sorry we missed you", "man", None) in fake.ops
    assert records(fake) == [(60, True)]
    assert fake.ops.index(("played", "Sorry we missed you.wav")) < fake.ops.index(
        next(op for op in fake.ops if op[0] == "record"))
    callback = next(op for op in fake.kinds("fetch") if op[1] == CALLBACK_URL)
    assert callback[3]["RecordingUrl"].startswith("https://rec.example/")
    assert result.ended_by == "document_end"


async def test_handover_voicemail_plays_a_greeting_url(tmp_path: Path) -> None:
    fake, _, _ = setup(tmp_path, ends=[HANDED_OVER])
    await run(fake, agent(handover={"voicemail": {"greetingPlayUrl": "/vm/greeting.wav",
                                                  "greetingText": ""}}))
    assert ("audio", "https://app.example/vm/greeting.wav") in fake.ops
    assert fake.said() == ["greeting"] and records(fake) == [(VOICEMAIL_MAX_LENGTH_S, True)]


async def test_a_greeting_that_cannot_play_still_takes_the_message(tmp_path: Path) -> None:
    fake, _, _ = setup(tmp_path, ends=[HANDED_OVER])
    fake.prompts.failing.add("https://cdn.example/missing.wav")
    result = await run(fake, agent(handover={"voicemail": {
        "greetingPlayUrl": "https://cdn.example/missing.wav", "beep": False}}))
    assert codes(result) == ["media_fetch_failed"] and records(fake) == [
        (VOICEMAIL_MAX_LENGTH_S, False)]


# -- onUnavailable --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ended",
    [StreamEnd("unreachable", "connection refused"), StreamEnd("refused", "HTTP 403"),
     StreamEnd("dropped", "reset", connected=False)],
)
async def test_an_unusable_runtime_takes_on_unavailable_default_hangup(
    tmp_path: Path, ended: StreamEnd
) -> None:
    fake, _, _ = setup(tmp_path, ends=[ended])
    fake.app.routes[HANDOVER_URL] = {"actions": [say("never")]}
    result = await run(fake, say("hi"), agent(handover={"callbackUrl": HANDOVER_URL}))
    assert result.ended_by == "hangup_verb" and fake.kinds("hangup")
    assert fake.said() == ["hi"] and not [op for op in fake.kinds("fetch")
                                          if op[1] == HANDOVER_URL]
    assert codes(result) == ["ai_agent_unavailable"]
    assert ended.reason in result.errors[0].message and ended.message in result.errors[0].message


async def test_no_runtime_configured_is_unavailable(tmp_path: Path) -> None:
    fake, streams, _ = setup(tmp_path, ends=[], runtime=None)
    result = await run(fake, agent(onUnavailable="voicemail"))
    assert not streams.requests
    assert codes(result) == ["ai_agent_unavailable"]
    assert "[ai_agents] url is unset" in result.errors[0].message
    assert fake.said() == [DEFAULT_GREETING] and records(fake) == [(VOICEMAIL_MAX_LENGTH_S, True)]


async def test_a_runtime_open_refused_is_unavailable(tmp_path: Path) -> None:
    fake, streams, _ = setup(tmp_path, ends=[])
    streams.refuse = MediaError("url_forbidden", "not allowed")
    result = await run(fake, agent())
    assert codes(result) == ["ai_agent_unavailable"] and result.ended_by == "hangup_verb"


async def test_on_unavailable_voicemail_prefers_its_own_then_the_handovers(
    tmp_path: Path,
) -> None:
    down = [StreamEnd("unreachable", "down")]
    fake, _, _ = setup(tmp_path, ends=list(down))
    await run(fake, agent(onUnavailable="voicemail", voicemail={"greetingText": "own"},
                          handover={"voicemail": {"greetingText": "handover's"}}))
    assert fake.said() == ["own"] and len(records(fake)) == 1
    fake, _, _ = setup(tmp_path, ends=list(down))
    await run(fake, agent(onUnavailable="voicemail",
                          handover={"voicemail": {"greetingText": "handover's"}}))
    assert fake.said() == ["handover's"]
    fake, _, _ = setup(tmp_path, ends=list(down))
    await run(fake, agent(onUnavailable="voicemail", handover={"callbackUrl": HANDOVER_URL},
                          voicemail={"beep": False}))
    assert fake.said() == [DEFAULT_GREETING_NO_BEEP] and records(fake) == [
        (VOICEMAIL_MAX_LENGTH_S, False)]


async def test_on_unavailable_forward_prefers_its_own_then_the_handovers(
    tmp_path: Path,
) -> None:
    down = [StreamEnd("unreachable", "down")]
    own = {"destinations": ["+254711000001"]}
    theirs = {"destinations": ["+254711000002"]}
    fake, _, dialer = setup(tmp_path, ends=list(down))
    await run(fake, agent(onUnavailable="forward", forward=own, handover={"forward": theirs}))
    assert [t.value for r in dialer.requests for t in r.targets] == ["+254711000001"]
    fake, _, dialer = setup(tmp_path, ends=list(down))
    await run(fake, agent(onUnavailable="forward", handover={"forward": theirs}))
    assert [t.value for r in dialer.requests for t in r.targets] == ["+254711000002"]
    fake, _, dialer = setup(tmp_path, ends=list(down))
    result = await run(fake, agent(onUnavailable="forward"))
    assert not dialer.requests and result.ended_by == "hangup_verb"
    assert codes(result) == ["ai_agent_unavailable", "forward_unavailable"]


async def test_on_unavailable_callback_posts_the_handover_url_else_the_voice_callback(
    tmp_path: Path,
) -> None:
    fake, _, _ = setup(tmp_path, ends=[StreamEnd("refused", "agent has no published revision")])
    fake.app.routes[HANDOVER_URL] = {"actions": [say("agent is away")]}
    result = await run(fake, agent(onUnavailable="callback",
                                   handover={"callbackUrl": HANDOVER_URL}))
    fetch = next(op for op in fake.kinds("fetch") if op[1] == HANDOVER_URL)
    assert fetch[2:] == ("POST", {"AgentId": "ag_1", "AgentStatus": "unavailable",
                                  "AgentError": "agent has no published revision"})
    assert fake.said() == ["agent is away"] and result.ended_by == "document_end"

    fake, _, _ = setup(tmp_path, ends=[], runtime=None)
    fake.app.routes[CALLBACK_URL] = {"actions": [say("fallback")]}
    await run(fake, agent(onUnavailable="callback"))
    fetch = fake.kinds("fetch")[0]
    assert fetch[1] == CALLBACK_URL and fetch[3]["AgentStatus"] == "unavailable"
    assert fake.said() == ["fallback"]


async def test_on_unavailable_callback_empty_reply_ends_the_call(tmp_path: Path) -> None:
    fake, _, _ = setup(tmp_path, ends=[], runtime=None)
    result = await run(fake, agent(onUnavailable="callback"))
    assert result.ended_by == "document_end" and fake.kinds("hangup")


async def test_handover_callback_url_is_relative_to_the_document(tmp_path: Path) -> None:
    assert FIRST_URL.startswith("https://app.example/")
    fake, _, _ = setup(tmp_path, ends=[HANDED_OVER])
    fake.app.routes["https://app.example/voice/handover"] = {}
    await run(fake, agent(handover={"callbackUrl": "handover"}))
    assert [op[1] for op in fake.kinds("fetch")] == ["https://app.example/voice/handover"]


async def test_a_voice_app_that_answers_every_callback_with_an_agent_fails_the_call(
    tmp_path: Path,
) -> None:
    fake, _, _ = setup(tmp_path, ends=[], runtime=None)
    fake.app.routes[CALLBACK_URL] = {"actions": [agent(onUnavailable="callback")]}
    with pytest.raises(VoiceAppError) as e:
        await run(fake, agent(onUnavailable="callback"))
    assert e.value.code == "ai_agent_loop"
    assert len(fake.kinds("fetch")) == MAX_AI_AGENTS
