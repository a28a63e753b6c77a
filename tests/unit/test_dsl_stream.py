"""`stream` against a fake call and fake Streams: what the SDK may write is accepted (and what
it may not is refused, naming the parameter), the StreamRequest it builds, connect true/false,
an interrupt and the caller's hangup stopping the fork, a refused URL skipped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from dsl.context import MediaError, StreamEnd, StreamRequest, VoiceAppError
from dsl.document import parse_document
from dsl.errors import DocumentError
from dsl.interpreter import Interpreter
from dsl.verbs import Stream
from dsl.verbs.base import RunState
from tests.unit.test_dsl_fakes import FIRST_URL, Fake, doc, say
from tests.unit.test_room_verb import LiveLeg

URL = "wss://ai.example/audio"


class FakeFork:
    """A fork that ends when the test says (`finish`) or when stopped."""

    def __init__(self, name: str, ops: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.ops = ops
        self.ended: asyncio.Future[StreamEnd] = asyncio.get_running_loop().create_future()
        self.stops = 0

    def finish(self, end: StreamEnd) -> None:
        if not self.ended.done():
            self.ops.append(("fork_ended", self.name, end.reason))
            self.ended.set_result(end)

    async def stop(self) -> StreamEnd:
        self.stops += 1
        self.ops.append(("fork_stop", self.name))
        self.finish(StreamEnd("stopped"))
        return self.ended.result()


class FakeStreams:
    """Implements dsl Streams. `ends[i]` is how the i-th fork opened ends, after `after_s`
    (None: it runs until stopped); `refuse` makes `open` raise it."""

    def __init__(self, ops: list[tuple[Any, ...]], agent: Any = None) -> None:
        self.ops = ops
        self.agent = agent
        self.requests: list[StreamRequest] = []
        self.forks: list[FakeFork] = []
        self.ends: list[StreamEnd | None] = []
        self.after_s = 0.05
        self.refuse: MediaError | None = None

    async def open(self, request: StreamRequest) -> FakeFork:
        self.ops.append(("stream_open", request.url))
        if self.refuse is not None:
            raise self.refuse
        self.requests.append(request)
        fork = FakeFork(request.name or f"stream-{len(self.forks) + 1}", self.ops)
        self.forks.append(fork)
        end = self.ends.pop(0) if self.ends else None
        if end is not None:
            asyncio.get_running_loop().call_later(self.after_s, fork.finish, end)
        return fork

    async def stop(self, name: str | None = None) -> int:
        running = [f for f in self.forks if not f.ended.done() and name in (None, f.name)]
        for f in running:
            await f.stop()
        return len(running)


def live_fake(tmp: Path, agent: Any = None) -> tuple[Fake, FakeStreams]:
    """A fake call whose `wait` lasts while the call lives, with fake Streams."""
    fake = Fake(tmp)
    fake.leg = LiveLeg(fake.ops)
    fake.ctx.leg = fake.leg
    streams = FakeStreams(fake.ops, agent)
    fake.ctx.streams = streams
    return fake, streams


def stream(**params: Any) -> dict[str, Any]:
    return {"stream": {"url": URL, **params}}


def one(**params: Any) -> Stream:
    verb = parse_document({"actions": [stream(**params)]}).actions[0]
    assert isinstance(verb, Stream)
    return verb


def refusal(**params: Any) -> str:
    with pytest.raises(DocumentError) as e:
        one(**params)
    assert len(e.value.errors) == 1, e.value.errors
    return str(e.value.errors[0])


def request_of(**params: Any) -> StreamRequest:
    return one(**params).request(RunState(document_url=FIRST_URL))


# -- validation: every document the SDK can emit -------------------------------------------


def test_defaults() -> None:
    r = request_of()
    assert (r.url, r.track, r.connect, r.output_rate, r.playback_rate) == (
        URL, "inbound_track", False, 8000, 8000)
    assert (r.name, r.headers, r.metadata, r.status_callback, r.status_events, r.purpose) == (
        None, None, None, None, frozenset(), "stream")


@pytest.mark.parametrize(
    ("rate", "hz"), [(8000, 8000), (16000, 16000), (24000, 24000), (44100, 44100),
                     (22050.5, 22051), (48000.0, 48000), (0.2, 1), (384000, 384000)],
)
def test_rates_are_any_positive_number_rounded_to_hz(rate: float, hz: int) -> None:
    r = request_of(outputSamplingRate=rate, bidirectionalSamplingRate=rate,
                   inputSamplingRate=rate)
    assert (r.output_rate, r.playback_rate) == (hz, hz)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"outputSamplingRate": 0}, "stream.outputSamplingRate: must be greater than 0"),
        ({"bidirectionalSamplingRate": -8000},
         "stream.bidirectionalSamplingRate: must be greater than 0"),
        ({"inputSamplingRate": 384001}, "stream.inputSamplingRate: must be at most 384000"),
        ({"outputSamplingRate": "16000"}, "stream.outputSamplingRate: expected a number"),
        ({"outputSamplingRate": True}, "stream.outputSamplingRate: expected a number"),
    ],
)
def test_bad_rates_are_refused(params: dict[str, Any], message: str) -> None:
    assert message in refusal(**params)


@pytest.mark.parametrize(
    "events",
    [
        "stream-started stream-stopped stream-error",
        "stream-started,stream-stopped,stream-error",
        " stream-started, stream-stopped\tstream-error ",
        ["stream-started", "stream-stopped", "stream-error"],
        ["stream-started stream-stopped", "stream-error"],
    ],
)
def test_status_events_every_written_form(events: Any) -> None:
    r = request_of(statusCallback="https://app.example/s", statusEvents=events)
    assert r.status_events == {"stream-started", "stream-stopped", "stream-error"}


def test_status_events_subset_none_and_default() -> None:
    cb = "https://app.example/s"
    assert request_of(statusCallback=cb, statusEvents="stream-error").status_events == {
        "stream-error"}
    assert request_of(statusCallback=cb, statusEvents="").status_events == frozenset()
    assert request_of(statusCallback=cb).status_events == {
        "stream-started", "stream-stopped", "stream-error"}
    # Nowhere to send them: none.
    assert request_of(statusEvents="stream-error").status_events == frozenset()


def test_a_wrong_status_event_is_named() -> None:
    assert refusal(statusEvents="stream-started start") == (
        'actions[0].stream.statusEvents: unknown status event "start"; '
        "expected stream-started, stream-stopped or stream-error")
    assert refusal(statusEvents=["stream-started", "stream-stoped"]) == (
        'actions[0].stream.statusEvents: unknown status event "stream-stoped"; '
        "did you mean stream-stopped?")
    assert "expected a string or a list" in refusal(statusEvents=3)


def test_header_metadata_is_parsed_into_headers() -> None:
    r = request_of(headerMetadata=json.dumps({"tenant": "acme", "n": 2}))
    assert r.headers == {"tenant": "acme", "n": 2}
    assert request_of(headerMetadata="{}").headers == {}


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ({"tenant": "acme"}, 'e.g. JSON.stringify({"tenant": "acme"})'),
        ("tenant=acme", "; not JSON"),
        ('["a"]', ", got a serialised list"),
        ('"acme"', ", got a serialised str"),
        ("null", ", got a serialised null"),
        (5, 'e.g. JSON.stringify({"tenant": "acme"})'),
    ],
)
def test_bad_header_metadata_is_refused_naming_it(value: Any, detail: str) -> None:
    message = refusal(headerMetadata=value)
    assert message.startswith(
        "actions[0].stream.headerMetadata: expected a JSON object serialised as a string")
    assert detail in message


def test_open_metadata_string_or_object_is_kept_as_given() -> None:
    assert request_of(openMetadata="opaque ✓").metadata == "opaque ✓"
    assert request_of(openMetadata={"a": [1]}).metadata == {"a": [1]}


def test_status_callback_resolves_against_the_document_and_is_http_only() -> None:
    assert request_of(statusCallback="/stream/status").status_callback == (
        "https://app.example/stream/status")
    assert request_of(statusCallback="http://x.example/s").status_callback == (
        "http://x.example/s")
    for bad in ("ftp://x.example/s", "wss://x.example/s", "javascript:alert(1)"):
        assert refusal(statusCallback=bad) == (
            "actions[0].stream.statusCallback: expected an http:// or https:// URL")


def test_url_must_be_ws_or_wss_and_track_one_of_three() -> None:
    assert "stream.url: invalid format" in refusal(url="https://ai.example/audio")
    assert request_of(url="ws://ai.example:8080/a?x=1").url == "ws://ai.example:8080/a?x=1"
    assert "stream.track" in refusal(track="inbound")
    for track in ("inbound_track", "outbound_track", "both_tracks"):
        assert request_of(track=track).track == track


def test_the_whole_sdk_shape_builds_its_request() -> None:
    r = request_of(track="both_tracks", connect=True, outputSamplingRate=16000,
                   bidirectionalSamplingRate=24000, name="agent", inputSamplingRate=8000,
                   headerMetadata=json.dumps({"customer": "42"}), openMetadata="hello",
                   statusCallback="https://app.example/stream",
                   statusEvents="stream-started stream-stopped")
    assert r == StreamRequest(
        url=URL, track="both_tracks", connect=True, output_rate=16000, playback_rate=24000,
        name="agent", headers={"customer": "42"}, metadata="hello",
        status_callback="https://app.example/stream",
        status_events=frozenset({"stream-started", "stream-stopped"}),
    )


# -- running --------------------------------------------------------------------------------


async def test_without_streams_it_is_unsupported(tmp_path: Path) -> None:
    fake = Fake(tmp_path)
    with pytest.raises(VoiceAppError) as e:
        await Interpreter(fake.ctx).run(doc(stream(connect=True)))
    assert e.value.code == "verb_unsupported"


async def test_connect_false_forks_and_the_document_goes_on_at_once(tmp_path: Path) -> None:
    fake, streams = live_fake(tmp_path)
    result = await Interpreter(fake.ctx).run(doc(say("hi"), stream(), say("after")))
    assert fake.said() == ["hi", "after"] and result.ended_by == "document_end"
    assert streams.requests[0].connect is False
    fork = streams.forks[0]
    assert not fork.ended.done() and fork.stops == 0  # the call's end stops it (the gateway)
    assert fake.ops.index(("stream_open", URL)) < fake.ops.index(("play", "after.wav"))


async def test_connect_true_holds_until_the_fork_ends_then_goes_on(tmp_path: Path) -> None:
    fake, streams = live_fake(tmp_path)
    streams.ends = [StreamEnd("disconnect", connected=True)]
    result = await Interpreter(fake.ctx).run(doc(stream(connect=True), say("after")))
    assert fake.said() == ["after"] and result.ended_by == "document_end"
    assert fake.ops.index(("fork_ended", "stream-1", "disconnect")) < fake.ops.index(
        ("play", "after.wav"))
    assert streams.forks[0].stops == 0 and not result.errors


@pytest.mark.parametrize("reason", ["unreachable", "refused", "dropped"])
async def test_a_failed_socket_is_noted_and_the_document_goes_on(
    tmp_path: Path, reason: Any
) -> None:
    fake, streams = live_fake(tmp_path)
    streams.ends = [StreamEnd(reason, "no answer from ai.example")]
    result = await Interpreter(fake.ctx).run(doc(stream(connect=True), say("after")))
    assert fake.said() == ["after"]
    assert [(e.code, e.path, e.message) for e in result.errors] == [
        (f"stream_{reason}", "actions[0].stream", "no answer from ai.example")]


async def test_a_redirect_while_connected_stops_the_fork(tmp_path: Path) -> None:
    fake, streams = live_fake(tmp_path)
    interpreter = Interpreter(fake.ctx)
    task = asyncio.ensure_future(interpreter.run(doc(stream(connect=True), say("never"))))
    for _ in range(100):
        if streams.forks:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)
    assert not task.done()
    assert interpreter.interrupt(doc(say("new"), url="https://app.example/ivr/new"))
    result = await asyncio.wait_for(task, 2)
    fork = streams.forks[0]
    assert fork.stops == 1 and fork.ended.result().reason == "stopped"
    assert fake.said() == ["new"] and result.ended_by == "document_end"
    assert fake.ops.index(("fork_stop", "stream-1")) < fake.ops.index(("play", "new.wav"))


async def test_the_caller_hanging_up_ends_the_run_and_the_fork(tmp_path: Path) -> None:
    fake, streams = live_fake(tmp_path)
    task = asyncio.ensure_future(
        Interpreter(fake.ctx).run(doc(stream(connect=True, name="bot"), say("never"))))
    for _ in range(100):
        if streams.forks:
            break
        await asyncio.sleep(0.01)
    fake.leg.end()
    result = await asyncio.wait_for(task, 2)
    assert result.ended_by == "caller" and fake.said() == []
    assert streams.forks[0].name == "bot" and streams.forks[0].ended.done()


async def test_a_refused_url_is_skipped_and_the_document_goes_on(tmp_path: Path) -> None:
    fake, streams = live_fake(tmp_path)
    streams.refuse = MediaError("url_forbidden", "ai.example resolves to a private address")
    skips: list[tuple[str, str]] = []
    fake.ctx.on_skip = lambda verb, code: skips.append((verb, code))
    result = await Interpreter(fake.ctx).run(doc(stream(connect=True), say("after")))
    assert fake.said() == ["after"] and result.ended_by == "document_end"
    assert [(e.code, e.path) for e in result.errors] == [("url_forbidden", "actions[0].stream")]
    assert skips == [("stream", "url_forbidden")]
