"""Interrupting a running interpreter (live redirect / hangup commands) against a fake call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from dsl.context import FetchedDocument, RecordResult, VoiceAppError
from dsl.interpreter import END, MAX_REDIRECTS, Fetch, Interpreter, RunResult
from tests.unit.test_dsl_fakes import (
    CALLBACK_URL,
    FIRST_URL,
    Fake,
    FakeApp,
    FakeEvents,
    FakeLeg,
    doc,
    say,
)

LONG = 30.0  # "forever" for a prompt or a wait; every test ends long before


class LiveLeg(FakeLeg):
    """A FakeLeg whose media can be seen while it runs: what is transmitting, whether in-band
    DTMF is listened for, a recording that lasts until the call ends, a real `wait`."""

    def __init__(self, ops: list[tuple[Any, ...]], *, answered: bool = False) -> None:
        super().__init__(ops, answered=answered)
        self.play_seconds = LONG
        self.playing: set[str] = set()
        self.listening = False
        self.record_blocks = True  # False: FakeLeg's instant `record_result`

    async def play(self, wav: Path, *, stop: asyncio.Event | None = None) -> bool:
        self._check()
        self.ops.append(("play", wav.name))
        self.playing.add(wav.name)
        waiters = {asyncio.ensure_future(self._ended.wait())}
        if stop is not None:
            waiters.add(asyncio.ensure_future(stop.wait()))
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=self.play_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            self.ops.append(("cancelled", wav.name))
            raise
        finally:
            self.playing.discard(wav.name)  # what media's player.stopTransmit does
            for w in waiters:
                w.cancel()
        self._check()
        self.ops.append(("stopped", wav.name) if done else ("played", wav.name))
        return not done

    def listen_for_digits(self, on: bool) -> None:
        super().listen_for_digits(on)
        self.listening = on

    async def wait(self, seconds: float) -> None:
        self._check()
        self.ops.append(("wait", seconds))
        try:
            await asyncio.wait_for(self._ended.wait(), seconds)
        except TimeoutError:
            return
        self._check()

    async def record(
        self,
        dest: Path,
        *,
        max_length_s: float,
        silence_timeout_s: float,
        finish_on_key: str,
        beep: bool,
    ) -> RecordResult:
        # Like media: a partial file beside `dest`, renamed into place when recording ends.
        if not self.record_blocks:
            return await super().record(
                dest,
                max_length_s=max_length_s,
                silence_timeout_s=silence_timeout_s,
                finish_on_key=finish_on_key,
                beep=beep,
            )
        self._check()
        self.ops.append(("record", dest))
        part = dest.with_name(f".{dest.stem}.part.wav")
        part.write_bytes(b"RIFF partial")
        await self._ended.wait()  # only a hangup (or a cancel) ends this recording
        part.replace(dest)
        return RecordResult(dest, 1.4, "hangup")


class SlowApp(FakeApp):
    """A FakeApp whose listed URLs take `LONG` to answer (a fetch still in flight)."""

    def __init__(self, ops: list[tuple[Any, ...]]) -> None:
        super().__init__(ops)
        self.slow: set[str] = set()

    async def fetch(
        self, url: str, method: str, extra: Mapping[str, str] | None = None
    ) -> FetchedDocument:
        if url in self.slow:
            self.ops.append(("fetch_started", url, method))
            try:
                await asyncio.sleep(LONG)
            except asyncio.CancelledError:
                self.ops.append(("fetch_cancelled", url))
                raise
        return await super().fetch(url, method, extra)


class Live(Fake):
    leg: LiveLeg
    app: SlowApp

    def __init__(self, tmp: Path, *, answered: bool = False) -> None:
        super().__init__(tmp, answered=answered)
        self.leg = LiveLeg(self.ops, answered=answered)
        self.app = SlowApp(self.ops)
        self.ctx.leg = self.leg
        self.ctx.app = self.app
        self.interpreter = Interpreter(self.ctx)

    def start(self, first: FetchedDocument | Fetch) -> asyncio.Task[RunResult]:
        return asyncio.create_task(self.interpreter.run(first))


@pytest.fixture
def live(tmp_path: Path) -> Live:
    return Live(tmp_path)


def files(directory: Path) -> list[Path]:
    return list(directory.iterdir())


async def until(check: Callable[[], object], what: str = "condition") -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def finish(task: asyncio.Task[RunResult]) -> RunResult:
    return await asyncio.wait_for(task, 5)


async def test_redirect_mid_say_stops_the_prompt_and_runs_the_new_document(live: Live) -> None:
    task = live.start(doc(say("long"), say("never")))
    await until(lambda: "long.wav" in live.leg.playing, "the first prompt to play")
    assert live.interpreter.interrupt(doc(say("new"), url="https://app.example/ivr/new"))
    await until(lambda: "new.wav" in live.leg.playing, "the new prompt")
    assert live.leg.playing == {"new.wav"}  # the first prompt no longer transmits
    assert ("cancelled", "long.wav") in live.ops
    live.leg.play_seconds = 0.01
    live.interpreter.interrupt(doc(say("short")))  # and move on quickly
    result = await finish(task)
    assert live.said() == ["long", "new", "short"]
    assert live.leg.playing == set()
    assert (result.ended_by, result.documents, result.interrupts) == ("document_end", 3, 2)
    assert live.ops.count(("answer",)) == 1


@pytest.mark.parametrize("nested", [False, True], ids=["waiting", "prompting"])
async def test_redirect_mid_get_digits_posts_no_digits(live: Live, nested: bool) -> None:
    live.ctx.default_digit_timeout_s = LONG
    live.app.routes[CALLBACK_URL] = {"actions": [say("digits reply")]}
    params: dict[str, Any] = {"numDigits": 4}
    if nested:
        params["nested"] = [say("menu")]
    task = live.start(doc({"getDigits": params}, say("never")))
    await until(lambda: live.leg.listening, "getDigits to listen")
    if nested:
        await until(lambda: "menu.wav" in live.leg.playing, "the menu prompt")
    else:
        live.leg.press("1")  # one key of four: still collecting
        await until(lambda: live.leg.queue.empty(), "the key to be taken")
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(doc(say("after")))
    result = await finish(task)
    live.leg.press("2", "3", "4", "5")  # too late: nobody collects them
    await asyncio.sleep(0.02)
    assert live.said()[-1] == "after" and "never" not in live.said()
    assert not live.kinds("fetch")  # no Digits POST, not even with the key already pressed
    assert not live.leg.listening
    assert live.kinds("listen") == [("listen", True), ("listen", False)]
    assert live.leg.playing == set()
    assert result.ended_by == "document_end"


async def test_redirect_mid_record_discards_the_recording(live: Live, tmp_path: Path) -> None:
    live.app.routes[CALLBACK_URL] = {"actions": [say("recorded")]}
    task = live.start(doc({"record": {}}, say("never")))
    await until(lambda: live.kinds("record"), "record to start")
    assert files(tmp_path)  # the partial file exists
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(doc(say("after")))
    result = await finish(task)
    assert files(tmp_path) == []  # partial file deleted
    assert not live.kinds("recording_ready", "fetch")
    assert live.said() == ["after"]
    assert result.ended_by == "document_end"


async def test_api_hangup_mid_record_keeps_and_reports_it(live: Live, tmp_path: Path) -> None:
    live.app.routes[CALLBACK_URL] = {"actions": [say("never")]}
    task = live.start(doc({"record": {}}, say("never")))
    await until(lambda: live.kinds("record"), "record to start")
    assert live.interpreter.interrupt(END)
    await asyncio.sleep(0.02)
    assert not task.done()  # END does not cancel a recording: the hangup ends it
    live.leg.end()  # the gateway hangs up
    result = await finish(task)
    ((_, rec_id, path, *_),) = live.kinds("recording_ready")
    assert path.exists() and path.name == f"{rec_id}.wav"
    assert [op[1] for op in live.kinds("fetch")] == [CALLBACK_URL]
    assert result.ended_by == "api_hangup"
    assert live.said() == []


async def test_end_mid_say_stops_at_once_and_leaves_the_hangup_to_the_gateway(
    live: Live,
) -> None:
    task = live.start(doc(say("long"), say("never"), {"hangup": {}}))
    await until(lambda: live.leg.playing, "the prompt")
    assert live.interpreter.interrupt(END)
    result = await finish(task)
    assert result.ended_by == "api_hangup"
    assert live.leg.playing == set()
    assert live.said() == ["long"]
    assert not live.kinds("hangup")


async def test_end_is_final(live: Live) -> None:
    task = live.start(doc(say("long")))
    await until(lambda: live.leg.playing, "the prompt")
    assert live.interpreter.interrupt(END)
    assert not live.interpreter.interrupt(doc(say("no")))
    assert not live.interpreter.interrupt(END)
    assert (await finish(task)).ended_by == "api_hangup"


async def test_interrupt_with_a_url_fetches_it_like_redirect(live: Live) -> None:
    live.app.routes["https://app.example/voice/other"] = {"actions": [say("other")]}
    task = live.start(doc(say("long")))
    await until(lambda: live.leg.playing, "the prompt")
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(Fetch("other", "GET"))  # relative to the document
    result = await finish(task)
    assert live.kinds("fetch") == [("fetch", "https://app.example/voice/other", "GET", {})]
    assert live.said() == ["long", "other"]
    assert (result.ended_by, result.documents) == ("document_end", 2)


async def test_interrupt_before_run_replaces_the_first_document(live: Live) -> None:
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(doc(say("instead")))
    result = await finish(live.start(doc(say("first"))))
    assert live.said() == ["instead"]
    assert (result.documents, result.interrupts) == (1, 1)


async def test_end_before_run_runs_nothing(live: Live) -> None:
    assert live.interpreter.interrupt(END)
    result = await finish(live.start(doc(say("first"))))
    assert result.ended_by == "api_hangup"
    assert live.ops == []


async def test_interrupt_after_the_run_is_a_no_op(live: Live) -> None:
    live.leg.play_seconds = 0.01
    await finish(live.start(doc(say("a"))))
    ops = list(live.ops)
    assert not live.interpreter.interrupt(doc(say("late")))
    assert not live.interpreter.interrupt(END)
    await asyncio.sleep(0.02)
    assert live.ops == ops


async def test_interrupt_after_the_call_ended_is_refused(live: Live) -> None:
    task = live.start(doc(say("long")))
    await until(lambda: live.leg.playing, "the prompt")
    live.leg.end()
    assert not live.interpreter.interrupt(doc(say("late")))
    assert (await finish(task)).ended_by == "caller"


async def test_two_interrupts_in_a_row_the_last_wins(live: Live) -> None:
    task = live.start(doc(say("long")))
    await until(lambda: live.leg.playing, "the prompt")
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(doc(say("first")))
    assert live.interpreter.interrupt(doc(say("second")))
    result = await finish(task)
    assert live.said() == ["long", "second"]
    assert result.interrupts == 1


async def test_interrupt_while_fetching_the_replacement_wins(live: Live) -> None:
    slow = "https://app.example/voice/slow"
    live.app.slow.add(slow)
    task = live.start(doc(say("long")))
    await until(lambda: live.leg.playing, "the prompt")
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(Fetch(slow))
    await until(lambda: live.kinds("fetch_started"), "the fetch")
    assert live.interpreter.interrupt(doc(say("inline")))
    result = await finish(task)
    assert ("fetch_cancelled", slow) in live.ops
    assert live.said() == ["long", "inline"]
    assert result.interrupts == 2


async def test_interrupt_during_a_redirect_verbs_fetch_before_answer(live: Live) -> None:
    # A call not answered yet: the command replaces the document; its first media verb answers.
    slow = "https://app.example/voice/slow"
    live.app.slow.add(slow)
    task = live.start(doc({"redirect": {"url": slow}}))
    await until(lambda: live.kinds("fetch_started"), "the redirect's fetch")
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(doc(say("hello")))
    result = await finish(task)
    assert [op[0] for op in live.ops] == [
        "fetch_started",
        "fetch_cancelled",
        "answer",
        "tts",
        "play",
        "played",
        "hangup",
    ]
    assert result.ended_by == "document_end"


async def test_interrupt_mid_pause(live: Live) -> None:
    task = live.start(doc({"pause": {"length": LONG}}, say("never")))
    await until(lambda: live.kinds("wait"), "the pause")
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(doc(say("awake")))
    await finish(task)
    assert live.said() == ["awake"]


async def test_api_redirects_neither_count_nor_reset_the_loop_cap(live: Live) -> None:
    loop_url, side_url = "https://app.example/loop", "https://app.example/side"
    fetched = 0

    def looping() -> dict[str, Any]:
        nonlocal fetched
        fetched += 1
        if fetched == 5:  # a command arrives while this redirect's fetch is answered
            live.interpreter.interrupt(Fetch(side_url))
        return {"actions": [{"redirect": {"url": loop_url}}]}

    live.app.routes[loop_url] = looping
    live.app.routes[side_url] = {"actions": [{"redirect": {"url": loop_url}}]}
    task = live.start(doc({"redirect": {"url": loop_url}}))
    with pytest.raises(VoiceAppError) as info:
        await finish(task)
    assert info.value.code == "redirect_loop"
    # 4 counted before the command, the 5th superseded by it, the command's own fetch not
    # counted and not resetting: 6 more verb redirects reach the cap.
    assert fetched == MAX_REDIRECTS + 1
    assert [op[1] for op in live.kinds("fetch")].count(side_url) == 1


async def test_next_document_hook_is_asked_when_a_document_ends(live: Live) -> None:
    live.leg.play_seconds = 0.01
    asked: list[int] = []

    async def next_document() -> FetchedDocument | None:
        asked.append(len(asked))
        return doc(say(f"more {len(asked)}")) if len(asked) < 3 else None

    live.ctx.next_document = next_document
    result = await finish(live.start(doc(say("first"))))
    assert live.said() == ["first", "more 1", "more 2"]
    assert (result.ended_by, result.documents) == ("document_end", 3)
    assert live.ops[-1] == ("hangup",)


async def test_interrupt_while_asking_the_hook_cancels_it(live: Live) -> None:
    live.leg.play_seconds = 0.01
    calls: list[str] = []

    async def next_document() -> FetchedDocument | None:
        if calls:
            calls.append("second")
            return None
        calls.append("waiting")
        try:
            await asyncio.sleep(LONG)
        except asyncio.CancelledError:
            calls.append("cancelled")
            raise
        return None

    live.ctx.next_document = next_document
    task = live.start(doc(say("first")))
    await until(lambda: calls, "the hook to be asked")
    assert live.interpreter.interrupt(doc(say("pushed")))
    result = await finish(task)
    assert calls == ["waiting", "cancelled", "second"]
    assert live.said() == ["first", "pushed"]
    assert result.ended_by == "document_end"


async def test_cancelling_the_run_stops_the_verb(live: Live) -> None:
    task = live.start(doc(say("long")))
    await until(lambda: live.leg.playing, "the prompt")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert live.leg.playing == set()


async def test_a_redirect_from_the_first_document_still_is_relative(live: Live) -> None:
    # An inline replacement's own URL anchors its relative URLs.
    live.app.routes["https://ctl.example/a/b"] = {"actions": [say("b")]}
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(
        FetchedDocument({"actions": [{"redirect": {"url": "b"}}]}, "https://ctl.example/a/x")
    )
    await finish(live.start(doc(say("first"), url=FIRST_URL)))
    assert live.said() == ["b"]


async def test_run_can_fetch_its_first_document_and_be_interrupted_meanwhile(
    live: Live,
) -> None:
    slow = "https://app.example/voice/slow"
    live.app.slow.add(slow)
    live.leg.play_seconds = 0.01
    task = live.start(Fetch(slow, "GET"))
    await until(lambda: live.kinds("fetch_started"), "the first fetch")
    assert live.interpreter.interrupt(doc(say("instead")))
    result = await finish(task)
    assert ("fetch_cancelled", slow) in live.ops
    assert live.said() == ["instead"]
    assert (result.documents, result.interrupts) == (1, 1)


async def test_run_fetches_its_first_document(live: Live) -> None:
    live.app.routes[FIRST_URL] = {"actions": [say("fetched")]}
    live.leg.play_seconds = 0.01
    result = await finish(live.start(Fetch(FIRST_URL)))
    assert live.kinds("fetch") == [("fetch", FIRST_URL, "POST", {})]
    assert live.said() == ["fetched"]
    assert result.ended_by == "document_end"


async def test_an_empty_first_fetched_document_is_still_refused(live: Live) -> None:
    live.app.routes[FIRST_URL] = {"actions": []}
    with pytest.raises(VoiceAppError) as info:
        await finish(live.start(Fetch(FIRST_URL)))
    assert info.value.code == "document_empty"


async def test_redirect_while_the_recording_is_reported_still_reports_it(live: Live) -> None:
    """Once the recording is done, telling the gateway of it (hash, store, `ready`) finishes
    even when a redirect stops the verb meanwhile: else the API says in_progress forever."""
    gate = asyncio.Event()
    events = live.ctx.events

    async def slow_ready(recording_id: str, path: Path, duration_s: float, fmt: str) -> str:
        live.ops.append(("reporting", recording_id))
        await gate.wait()  # hashing on a thread, then waiting for the commit
        return await FakeEvents.recording_ready(events, recording_id, path, duration_s, fmt)

    events.recording_ready = slow_ready  # type: ignore[method-assign]
    live.leg.record_blocks = False
    live.app.routes[CALLBACK_URL] = {"actions": [say("never")]}
    task = live.start(doc({"record": {}}, say("never")))
    await until(lambda: live.kinds("reporting"), "the report to start")
    live.leg.play_seconds = 0.01
    assert live.interpreter.interrupt(doc(say("after")))
    await until(lambda: "after" in live.said(), "the redirect to run")
    gate.set()
    result = await finish(task)
    await until(lambda: live.kinds("recording_ready"), "the recording to be reported")
    assert not live.kinds("fetch")  # the verb was stopped: no action POST
    assert result.ended_by == "document_end"
