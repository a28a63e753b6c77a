"""MCP control against a real controller (aiohttp on 127.0.0.1) and a fake call leg."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dsl.context import CallEnded, FetchedDocument, RecordResult
from dsl.interpreter import Interpreter
from gateway.demo import free_port
from gateway.events.signing import SIGNATURE_HEADER
from gateway.mcp import MCP_CALLBACK_URL, McpController
from tests.seed_receiver import verify_signature
from tests.unit.test_dsl_fakes import say
from tests.unit.test_dsl_interrupt import Live, finish, until

SECRET = "whsec_mcp_test"
HOLD_URL = "https://media.example/hold.wav"
FIELDS = {
    "callId": "call-1",
    "from": "+254700000001",
    "to": "+254722000002",
    "direction": "outbound",
    "callStatus": "in-progress",
    "clientRequestId": "crm-42",
}


class Controller:
    """The customer's MCP controller: records each state POST, answers from a script.

    Each script item: a dict (JSON reply), an int (that status, empty body), or a float
    (seconds to sleep before answering 204). Past the script's end: 204.
    """

    def __init__(self) -> None:
        self.script: list[dict[str, Any] | int | float] = []
        self.seen: list[tuple[bytes, str]] = []  # (raw body, signature header)
        self.arrived = asyncio.Event()

    @property
    def states(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw, _ in self.seen]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.seen.append((raw, request.headers.get(SIGNATURE_HEADER, "")))
        self.arrived.set()
        step = self.script.pop(0) if self.script else 204
        if isinstance(step, dict):
            return web.json_response(step)
        if isinstance(step, float):
            await asyncio.sleep(step)
            return web.Response(status=204)
        return web.Response(status=step)


@pytest.fixture
async def controller() -> AsyncIterator[tuple[Controller, str]]:
    ctl = Controller()
    app = web.Application()
    app.router.add_post("/mcp", ctl.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield ctl, f"http://127.0.0.1:{port}/mcp"
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def live(tmp_path: Path) -> Live:
    live = Live(tmp_path, answered=True)
    live.leg.play_seconds = 0.01
    return live


def make(live: Live, session: aiohttp.ClientSession, url: str, **options: Any) -> McpController:
    options.setdefault("control_timeout_ms", 2000)
    options.setdefault("hold_grace_s", 0.0)
    mcp = McpController(session, url, SECRET, FIELDS, leg=live.leg, prompts=live.prompts, **options)
    live.ctx.next_document = mcp.next_document
    live.ctx.app = mcp
    live.ctx.voice_callback_url = MCP_CALLBACK_URL
    live.interpreter = Interpreter(live.ctx)
    return mcp


def actions_of(document: FetchedDocument) -> list[dict[str, Any]]:
    body: dict[str, Any] = document.body
    return list(body["actions"])


async def test_opening_actions_then_actions_from_the_post_reply(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    ctl.script = [{"actions": [say("from the reply")]}, {"actions": [{"hangup": {}}]}]
    mcp = make(live, session, url, opening_actions=[say("opening")])
    result = await finish(live.start(mcp.opening()))
    assert live.said() == ["opening", "from the reply"]
    assert result.ended_by == "hangup_verb"
    first, second = ctl.states
    assert first == {**FIELDS, "cycle": 1, "reason": "document_end"}
    assert (second["cycle"], second["reason"]) == (2, "document_end")
    for raw, header in ctl.seen:
        verify_signature(raw, header, SECRET)  # the quickstart's own verifier


async def test_without_opening_actions_the_first_cycle_is_asked_on_answer(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    ctl.script = [{"actions": [say("first"), {"redirect": {"url": "/voice/next"}}]}]
    inner = live.app
    inner.routes[url.replace("/mcp", "/voice/next")] = {"actions": [{"hangup": {}}]}
    mcp = make(live, session, url, inner=inner)
    result = await finish(live.start(mcp.opening()))
    assert ctl.states[0] == {**FIELDS, "cycle": 1, "reason": "answered"}
    assert live.said() == ["first"]
    # relative URLs in the controller's actions resolve against the control URL; a redirect
    # verb goes to the call's voice app
    assert [op[1] for op in live.kinds("fetch")] == [url.replace("/mcp", "/voice/next")]
    assert result.ended_by == "hangup_verb"


async def test_an_interrupt_during_the_first_cycle_cancels_it(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    mcp = make(live, session, url, hold_audio_url=HOLD_URL)
    task = live.start(mcp.opening())
    await until(lambda: "hold.wav" in live.leg.playing, "hold audio")
    assert live.interpreter.interrupt(FetchedDocument({"actions": [{"hangup": {}}]}, url))
    result = await finish(task)
    assert result.ended_by == "hangup_verb"
    assert live.leg.playing == set()
    assert len(ctl.seen) == 1


async def test_respond_answers_a_waiting_cycle_while_hold_audio_plays(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    live.leg.play_seconds = 30  # the hold file is long: it must be stopped, not end by itself
    mcp = make(live, session, url, hold_audio_url=HOLD_URL)
    ask = asyncio.create_task(mcp.next_document())
    await until(lambda: "hold.wav" in live.leg.playing, "hold audio")
    assert ctl.seen  # the state was POSTed and answered 204: waiting for respond
    assert ("audio", HOLD_URL) in live.ops
    assert mcp.respond([say("responded")])
    document = await asyncio.wait_for(ask, 2)
    assert actions_of(document) == [say("responded")]
    assert live.leg.playing == set()  # the hold audio stopped the moment actions came
    assert ("stopped", "hold.wav") in live.ops


async def test_hold_audio_loops_until_actions_arrive(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    live.leg.play_seconds = 0.06
    ctl.script = [0.3]  # the reply itself comes late
    ctl.script.append({"actions": [say("late")]})  # unused: respond wins
    mcp = make(live, session, url, hold_audio_url=HOLD_URL)
    ask = asyncio.create_task(mcp.next_document())
    await until(lambda: live.kinds("played"), "the hold file to play to its end once")
    await until(lambda: len(live.kinds("play")) >= 3, "the hold file to loop")
    mcp.respond([say("now")])
    assert actions_of(await asyncio.wait_for(ask, 2)) == [say("now")]
    assert live.leg.playing == set()


async def test_a_fast_reply_plays_no_hold_audio(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    ctl.script = [{"actions": [say("quick")]}]
    mcp = make(live, session, url, hold_audio_url=HOLD_URL, hold_grace_s=1.0)
    assert actions_of(await mcp.next_document()) == [say("quick")]
    assert not live.kinds("play")


async def test_two_timeouts_run_the_fallback(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    mcp = make(live, session, url, control_timeout_ms=150, hold_audio_url=HOLD_URL)
    result = await finish(live.start(FetchedDocument({"actions": [say("hi")]}, url)))
    assert result.ended_by == "hangup_verb"  # the default fallback: hang up
    assert [(s["cycle"], s["reason"]) for s in ctl.states] == [(1, "document_end"), (2, "timeout")]
    assert mcp.fallbacks == 1
    assert live.leg.playing == set()
    assert live.ops[-1] == ("hangup",)


async def test_custom_fallback_actions(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    _, url = controller
    fallback = [say("sorry"), {"hangup": {}}]
    mcp = make(live, session, url, control_timeout_ms=100, fallback_actions=fallback)
    assert actions_of(await mcp.next_document()) == fallback


async def test_a_failing_controller_counts_as_a_timeout(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    ctl.script = [500, {"actions": [say("recovered")]}]
    mcp = make(live, session, url, control_timeout_ms=5000)
    started = asyncio.get_running_loop().time()
    assert actions_of(await mcp.next_document()) == [say("recovered")]
    assert asyncio.get_running_loop().time() - started < 2  # no waiting out the 5 s
    assert [s["reason"] for s in ctl.states] == ["document_end", "timeout"]


@pytest.mark.parametrize(
    "replies",
    [[503, 502], [{"actions": [{"sayy": {}}]}, {"nope": 1}]],
    ids=["5xx", "invalid"],
)
async def test_two_failures_run_the_fallback_at_once(
    live: Live,
    session: aiohttp.ClientSession,
    controller: tuple[Controller, str],
    replies: list[Any],
) -> None:
    ctl, url = controller
    ctl.script = list(replies)
    mcp = make(live, session, url, control_timeout_ms=5000)
    document = await asyncio.wait_for(mcp.next_document(), 2)
    assert actions_of(document) == [{"hangup": {}}]
    assert len(ctl.seen) == 2


async def test_an_unreachable_controller_runs_the_fallback(
    live: Live, session: aiohttp.ClientSession
) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"  # nobody listens
    mcp = make(live, session, url, control_timeout_ms=5000)
    document = await asyncio.wait_for(mcp.next_document(), 3)
    assert actions_of(document) == [{"hangup": {}}]


async def test_a_respond_while_no_cycle_waits_answers_the_next(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    ctl.script = [{"actions": [say("ignored")]}]
    mcp = make(live, session, url)
    assert mcp.respond([say("early")])
    assert mcp.respond([say("earlier replaced")])  # the last one is kept
    assert actions_of(await mcp.next_document()) == [say("earlier replaced")]
    await asyncio.wait_for(ctl.arrived.wait(), 2)  # the state still reached the controller
    assert ctl.states[0]["cycle"] == 1
    await mcp.aclose()
    assert not mcp.respond([say("too late")])


async def test_digits_reach_the_controller_and_its_reply_replaces_the_rest(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    ctl.script = [{"actions": [say("you chose 1"), {"hangup": {}}]}]
    live.leg.digits_on_listen = ["1", "#"]
    mcp = make(live, session, url, opening_actions=[{"getDigits": {}}, say("never")])
    result = await finish(live.start(mcp.opening()))
    assert live.said() == ["you chose 1"]
    assert result.ended_by == "hangup_verb"
    ((state),) = ctl.states
    assert (state["Digits"], state["reason"], state["cycle"]) == ("1", "digits", 1)
    assert state["callId"] == "call-1"


async def test_other_urls_go_to_the_inner_voice_app(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    inner = live.app
    inner.routes["https://app.example/menu"] = {"actions": [{"hangup": {}}]}
    mcp = make(live, session, url, inner=inner)
    document = await mcp.fetch("https://app.example/menu", "GET")
    assert actions_of(document) == [{"hangup": {}}]
    assert not ctl.seen


async def test_call_ending_while_waiting_stops_the_cycle(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    _, url = controller
    mcp = make(live, session, url, control_timeout_ms=10000, hold_audio_url=HOLD_URL)
    ask = asyncio.create_task(mcp.next_document())
    await until(lambda: live.leg.playing, "hold audio")
    live.leg.end()
    with pytest.raises(CallEnded):
        await asyncio.wait_for(ask, 2)
    assert live.leg.playing == set()
    assert not mcp.respond([say("too late")])


async def test_an_interrupt_while_waiting_stops_hold_and_keeps_later_responds(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    mcp = make(live, session, url, control_timeout_ms=10000, hold_audio_url=HOLD_URL)
    task = live.start(FetchedDocument({"actions": [say("first")]}, url))
    await until(lambda: "hold.wav" in live.leg.playing, "hold audio")
    assert live.interpreter.interrupt(FetchedDocument({"actions": [say("pushed")]}, url))
    await until(lambda: "pushed" in live.said(), "the redirect's document")
    hold_ended = next(i for i, op in enumerate(live.ops) if op[0] in ("stopped", "cancelled"))
    assert live.ops[hold_ended][1] == "hold.wav"
    assert hold_ended < live.ops.index(("play", "pushed.wav"))  # no overlap
    await until(lambda: len(ctl.seen) == 2, "the next cycle")  # after "pushed" ran
    assert mcp.respond([{"hangup": {}}])
    result = await finish(task)
    assert result.ended_by == "hangup_verb"
    assert [s["cycle"] for s in ctl.states] == [1, 2]


async def test_a_recording_after_the_hangup_still_reaches_the_controller(
    live: Live, session: aiohttp.ClientSession, controller: tuple[Controller, str]
) -> None:
    ctl, url = controller
    ctl.script = [{"actions": [say("no call to say this on")]}]
    live.leg.record_blocks = False
    live.leg.record_result = lambda p: RecordResult(p, 3.2, "hangup")
    mcp = make(live, session, url, opening_actions=[{"record": {}}])
    result = await finish(live.start(mcp.opening()))
    assert result.ended_by == "caller"
    ((state),) = ctl.states
    assert state["reason"] == "record"
    assert (state["RecordingDuration"], state["RecordingUrl"]) == (
        "3",
        f"https://rec.example/{state['recordingId']}",
    )
    assert live.said() == []
