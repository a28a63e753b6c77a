"""`getDigits`: collect DTMF digits, optionally while prompts play (barge-in)."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from dsl.context import CallContext, CallEnded, CallLeg, MediaError
from dsl.verbs.base import (
    DTMF_KEY_PATTERN,
    DTMF_KEYS_PATTERN,
    NEXT,
    Needs,
    PromptVerb,
    RunState,
    Step,
    Verb,
    extension,
    reply_step,
)
from dsl.verbs.play import Play
from dsl.verbs.say import Say

MAX_DIGITS = 128  # with numDigits 0 and no finish key, a caller cannot grow the POST forever


class _Nested(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @property
    def prompt(self) -> PromptVerb:
        raise NotImplementedError


class NestedSay(_Nested):
    say: Say

    @property
    def prompt(self) -> PromptVerb:
        return self.say


class NestedPlay(_Nested):
    play: Play

    @property
    def prompt(self) -> PromptVerb:
        return self.play


class GetDigits(Verb):
    """Collect digits the caller presses and POST them to the call's voice_callback_url.

    The `nested` prompts play while waiting; the first key press stops them (barge-in).
    Collection ends at `numDigits` digits, at `finishOnKey` (not included), or after
    `timeout` seconds without a key once the prompts have ended. Digits are POSTed as
    `Digits`; a non-empty reply document replaces the rest of this one. Without any digit
    the next action runs and nothing is fetched.
    """

    verb: ClassVar[str] = "getDigits"
    needs: ClassVar[Needs] = "media"
    nested_verbs: ClassVar[tuple[str, ...]] = ("say", "play")

    timeout: float = Field(
        0,
        ge=0,
        le=3600,
        description="Seconds to wait for a key after the prompts end; 0 = the gateway default "
        "(default_digit_timeout_s, 5 s unless configured).",
    )
    num_digits: int = Field(
        0, ge=0, le=MAX_DIGITS, description="Stop after this many digits; 0 = no limit."
    )
    finish_on_key: str = Field(
        "#",
        pattern=DTMF_KEY_PATTERN,
        description='Key that ends input (not included in Digits): one of 0-9 * #, or "" for none.',
    )
    nested: list[NestedSay | NestedPlay] = Field(
        [],
        max_length=50,
        description="say/play prompts played while waiting; the first key press stops them.",
    )
    inter_digit_timeout: float | None = extension(
        None,
        gt=0,
        le=3600,
        description="Seconds allowed between digits once one was pressed; default `timeout`.",
    )
    flush_digits: bool = extension(
        False,
        description="Drop keys pressed before this getDigits started (no type-ahead).",
    )
    valid_digits: str | None = extension(
        None,
        pattern=DTMF_KEYS_PATTERN,
        description='Only these keys are collected (e.g. "123"); others are ignored.',
    )

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        leg = ctx.leg
        timeout = self.timeout or ctx.default_digit_timeout_s
        between = self.inter_digit_timeout or timeout
        if self.flush_digits:
            leg.flush_digits()
        # Otherwise type-ahead: keys pressed since the previous getDigits/record (during a
        # say/play) count, VoiceXML-style. In-band (audio) DTMF is only heard while listening.
        leg.listen_for_digits(True)
        try:
            if self.nested:
                first = await _key_within(await self._prompts(ctx, state), timeout)
            else:
                first = await leg.next_digit(timeout)
            digits = await self._collect(leg, first, timeout, between)
        finally:
            with suppress(CallEnded):
                leg.listen_for_digits(False)
        if not digits:
            return NEXT
        reply = await ctx.app.fetch(ctx.voice_callback_url, "POST", {"Digits": digits})
        return reply_step(reply)

    async def _prompts(self, ctx: CallContext, state: RunState) -> asyncio.Task[str | None]:
        """Play the nested prompts until the first key press.

        Returns the task waiting for that first key: still running when the prompts ended
        without one, so no key is lost between the prompts' end and the timeout.
        """
        stop = asyncio.Event()
        watcher = asyncio.create_task(ctx.leg.next_digit(None))
        watcher.add_done_callback(lambda _: stop.set())  # a key (or the call ending) stops it
        try:
            for i, item in enumerate(self.nested):
                prompt = item.prompt
                try:
                    if not await prompt.perform(ctx, state, stop):
                        break
                except MediaError as err:  # skip that prompt; still wait for digits
                    where = f"{state.path}.nested[{i}].{prompt.verb}"
                    state.skipped(prompt.verb, err.code, err.message, where)
        except BaseException:
            await _cancel(watcher)
            raise
        return watcher

    async def _collect(
        self, leg: CallLeg, first: str | None, first_wait: float, between: float
    ) -> str:
        digits, key = "", first
        while key is not None:  # None: timed out
            if self.finish_on_key and key == self.finish_on_key:
                break
            if self.valid_digits is None or key in self.valid_digits:
                digits += key
                if len(digits) >= (self.num_digits or MAX_DIGITS):
                    break
            key = await leg.next_digit(between if digits else first_wait)
        return digits


async def _key_within(watcher: asyncio.Task[str | None], timeout: float) -> str | None:
    """The watcher's key if it comes within `timeout`, else None."""
    try:
        await asyncio.wait([watcher], timeout=timeout)
    finally:
        await _cancel(watcher)
    return None if watcher.cancelled() else watcher.result()


async def _cancel(task: asyncio.Task[str | None]) -> None:
    if not task.done():
        task.cancel()
        await asyncio.wait([task])  # a key may have landed just before the cancel
    if not task.cancelled():
        task.exception()  # mark it retrieved: an error is re-raised by result() or dropped
