"""`conference`: put the caller in a named conference room until it lets go of them.

The room itself (who hears whom, across worker processes) is the gateway's (`ctx.rooms`,
gateway/rooms/); this verb is the call's side: enter (or hear that the room is full), hear the
waitUrl document until the room starts, post status events and keypad entries while in it,
and return when the room lets go (kicked, ended) so that the document goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine
from typing import Any, ClassVar

from pydantic import Field

from dsl.context import (
    CallContext,
    CallEnded,
    MediaError,
    RoomEntry,
    RoomNotice,
    RoomRefused,
    RoomSeat,
    VoiceAppError,
)
from dsl.errors import DocumentError, VerbUnsupported
from dsl.verbs.base import (
    DTMF_KEY_PATTERN,
    NEXT,
    Needs,
    PromptVerb,
    RunState,
    Step,
    Verb,
)

log = logging.getLogger(__name__)

# A space-separated subset of the four conference events.
STATUS_EVENTS_PATTERN = r"^\s*(start|end|join|leave)(\s+(start|end|join|leave))*\s*$"
FULL_MESSAGE = "Sorry, this conference is full."
MAX_ENTRY = 128  # digits in one keypad entry when neither numDigits nor finishOnKey ends it
_posting: set[asyncio.Task[None]] = set()  # status / digit POSTs outlive the verb


class Conference(Verb):
    """Join the caller to the conference `name` (per workspace), creating it on first entry.

    The caller hears every other participant and is heard by them (unless `muted`). Until a
    participant with `startOnEnter` is in, the room waits: its members hear the `waitUrl`
    document (its say/play actions, looped) or a hold tone. The verb ends, and the document
    goes on with its next action, when the caller is kicked or the room ends (`endOnExit`,
    the API); a join beyond `maxParticipants` hears a short message and goes on at once.
    Status events (`statusEvents`, default all four) are POSTed, signed like voice callbacks,
    to `statusEventsCallbackUrl` with `ConferenceName`, `StatusEvent`, `ParticipantCallId`
    and `ParticipantCount`; with `collectDigits`, each keypad entry (ended by `finishOnKey`
    or `numDigits`) is POSTed as `Digits` to `digitsCallbackUrl` (default the call's voice
    callback) and its reply ignored. `flags` accepted: muted, hold, beep, endOnExit,
    startOnEnter (others are logged and ignored). `record` records the room's mix while this
    caller is in it (`call.recording.ready` on this call).
    """

    verb: ClassVar[str] = "conference"
    needs: ClassVar[Needs] = "media"

    name: str = Field(min_length=1, max_length=128, description="Conference room name.")
    flags: str | list[str] | None = Field(None, description="Participant flags.")
    max_participants: int | None = Field(
        None, ge=0, le=1000, description="Refuse entry beyond this many; 0 = the platform default."
    )
    record: bool = Field(False, description="Record the conference.")
    beep: bool = Field(False, description="Beep when a participant joins or leaves.")
    muted: bool = Field(False, description="Join muted (listen only).")
    start_on_enter: bool = Field(
        True, description="The conference starts when this participant enters."
    )
    end_on_exit: bool = Field(
        False, description="The conference ends when this participant leaves."
    )
    wait_url: str | None = Field(
        None, max_length=2048, description="Audio played while waiting for the start."
    )
    status_events_callback_url: str | None = Field(
        None, max_length=2048, description="URL that receives conference status events."
    )
    status_events: str | None = Field(
        None,
        pattern=STATUS_EVENTS_PATTERN,
        description='Space-separated subset of "start end join leave".',
    )
    collect_digits: bool = Field(False, description="Collect digits pressed in the room.")
    finish_on_key: str = Field(
        "#", pattern=DTMF_KEY_PATTERN, description="Key that ends a digit entry."
    )
    num_digits: int = Field(0, ge=0, le=128, description="Digits per entry; 0 = no limit.")
    digits_callback_url: str | None = Field(
        None, max_length=2048, description="URL that receives collected digits."
    )

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        if ctx.rooms is None:
            raise VerbUnsupported(self.verb)
        recording_id = uuid.uuid4().hex if self.record else None
        entry = RoomEntry(
            name=self.name, muted=self.muted, beep=self.beep,
            start_on_enter=self.start_on_enter, end_on_exit=self.end_on_exit,
            max_participants=self.max_participants or 0, flags=self._flags(),
            wait_tone=self.wait_url is None,
            record_to=ctx.recordings_dir / f"{recording_id}.wav" if recording_id else None,
        )
        try:
            seat = await ctx.rooms.join(ctx.leg.call_id, entry)
        except RoomRefused as e:
            state.note(f"conference_{e.code}", e.message)
            await self._tell_full(ctx, state)
            return NEXT
        helpers = [asyncio.create_task(self._notices(ctx, state, seat))]
        if self.collect_digits:
            helpers.append(asyncio.create_task(self._digits(ctx, state, seat)))
        if self.wait_url is not None and not seat.started.is_set():
            helpers.append(asyncio.create_task(self._wait_music(ctx, state, seat)))
        alive = asyncio.ensure_future(_while_call_lives(ctx))
        try:
            either: set[asyncio.Future[Any]] = {seat.left, alive}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if seat.left.done():
                log.info("call %s: out of conference %s (%s)", ctx.leg.call_id, self.name,
                         seat.left.result())
                return NEXT
            alive.result()  # raises CallEnded
            raise CallEnded()  # (never reached)
        finally:
            for t in [alive, *helpers]:
                t.cancel()
            await asyncio.wait({alive, *helpers})
            for t in [alive, *helpers]:
                if not t.cancelled():
                    t.exception()
            voluntary = not seat.left.done()
            left = await seat.leave()
            self._drain_notices(ctx, seat)
            if voluntary and "leave" in self._status_events():
                self._post_status(ctx, "leave", ctx.leg.call_id, left.count)
            if left.recording is not None and recording_id is not None:
                path, seconds = left.recording
                with contextlib.suppress(Exception):
                    await ctx.events.recording_ready(recording_id, path, seconds, "wav")

    def _flags(self) -> tuple[str, ...]:
        if self.flags is None:
            return ()
        raw = self.flags.replace(",", " ").split() if isinstance(self.flags, str) else self.flags
        return tuple(f.strip() for f in raw if f.strip())

    def _status_events(self) -> set[str]:
        if self.status_events_callback_url is None:
            return set()
        return set((self.status_events or "start end join leave").split())

    async def _tell_full(self, ctx: CallContext, state: RunState) -> None:
        try:
            await ctx.leg.play(await ctx.prompts.tts(FULL_MESSAGE, None, None))
        except MediaError as e:
            state.note(e.code, f"conference full message: {e.message}")

    # -- while in the room ---------------------------------------------------------------------
    async def _notices(self, ctx: CallContext, state: RunState, seat: RoomSeat) -> None:
        wanted = self._status_events()
        while True:
            n = await seat.notices.get()
            if n.event in wanted:
                self._post_status(ctx, n.event, n.call_id, n.count)

    def _drain_notices(self, ctx: CallContext, seat: RoomSeat) -> None:
        wanted = self._status_events()
        while not seat.notices.empty():
            n: RoomNotice = seat.notices.get_nowait()
            if n.event in wanted:
                self._post_status(ctx, n.event, n.call_id, n.count)

    def _post_status(self, ctx: CallContext, event: str, call_id: str, count: int) -> None:
        assert self.status_events_callback_url is not None
        extra = {"ConferenceName": self.name, "StatusEvent": event,
                 "ParticipantCallId": call_id, "ParticipantCount": str(count)}
        _spawn(_post(ctx, self.status_events_callback_url, extra))

    async def _digits(self, ctx: CallContext, state: RunState, seat: RoomSeat) -> None:
        leg = ctx.leg
        target = (state.resolve(self.digits_callback_url) if self.digits_callback_url
                  else ctx.voice_callback_url)
        leg.listen_for_digits(True)
        try:
            digits = ""
            while True:
                key = await leg.next_digit(None)
                if key is None:
                    continue
                if self.finish_on_key and key == self.finish_on_key:
                    done = True
                else:
                    digits += key
                    limit = self.num_digits or (MAX_ENTRY if self.finish_on_key else 1)
                    done = len(digits) >= limit
                if done and digits:
                    _spawn(_post(ctx, target, {"Digits": digits, "ConferenceName": self.name}))
                    digits = ""
        finally:
            with contextlib.suppress(CallEnded):
                leg.listen_for_digits(False)

    async def _wait_music(self, ctx: CallContext, state: RunState, seat: RoomSeat) -> None:
        """The waitUrl document's say/play actions, looped until the room starts."""
        from dsl.document import parse_document

        assert self.wait_url is not None
        url = state.resolve(self.wait_url)
        try:
            doc = await ctx.app.fetch(url, "POST", {"ConferenceName": self.name})
            prompts = [v for v in parse_document(doc.body).actions if isinstance(v, PromptVerb)]
        except (VoiceAppError, DocumentError) as e:
            state.note("conference_wait_url", f"{url}: {e}; the hold tone instead")
            seat.hold_tone_while_waiting()
            return
        if not prompts:
            state.note("conference_wait_url", f"{url}: no say or play action; the hold tone")
            seat.hold_tone_while_waiting()
            return
        stop = asyncio.Event()
        watch = asyncio.ensure_future(seat.started.wait())
        watch.add_done_callback(lambda _: stop.set())
        wait_state = RunState(document_url=doc.url, call_id=state.call_id, path=state.path)
        try:
            while not stop.is_set():
                for prompt in prompts:
                    try:
                        if not await prompt.perform(ctx, wait_state, stop):
                            return
                    except MediaError as e:
                        state.note(e.code, f"waitUrl {prompt.verb}: {e.message}")
                        await asyncio.wait({watch}, timeout=1.0)
        finally:
            watch.cancel()


async def _while_call_lives(ctx: CallContext) -> None:
    """Raises CallEnded when the call ends (never returns otherwise)."""
    while True:
        await ctx.leg.wait(3600)


async def _post(ctx: CallContext, url: str, extra: dict[str, str]) -> None:
    try:
        await ctx.app.fetch(url, "POST", extra)
    except VoiceAppError as e:  # the reply is not used: a non-JSON one is fine
        if e.code not in ("callback_not_json", "document_empty"):
            log.info("conference POST to %s: %s", url, e)


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _posting.add(task)
    task.add_done_callback(_posting.discard)
