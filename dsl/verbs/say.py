"""`say`: speak text with the gateway's TTS."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from dsl.context import CallContext
from dsl.verbs.base import Needs, PromptVerb, RunState, loop_field

# BCP-47 as voice apps write it (en-KE, sw-KE, en-US, zh-Hant-TW); the TTS decides what it has.
log = logging.getLogger(__name__)

LANGUAGE_PATTERN = r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$"


class Say(PromptVerb):
    """Speak `text` to the caller (text-to-speech), `loop` times."""

    verb: ClassVar[str] = "say"
    needs: ClassVar[Needs] = "media"

    text: str = Field(max_length=4000, description="What to say; empty text is skipped (logged).")
    voice: str | None = Field(
        None,
        max_length=100,
        description='Voice name, e.g. "alice", "man", "woman"; the TTS picks its nearest.',
    )
    language: str | None = Field(
        None,
        pattern=LANGUAGE_PATTERN,
        description='BCP-47 language tag, e.g. "en-KE", "en-US", "sw-KE".',
    )
    loop: int = loop_field()

    async def perform(
        self, ctx: CallContext, state: RunState, stop: asyncio.Event | None = None
    ) -> bool:
        if not self.text.strip():  # the SDK lets `say("")` through: nothing to say, not an error
            log.info("call %s: %s: empty text, skipped", ctx.leg.call_id, state.path)
            return True
        return await super().perform(ctx, state, stop)

    async def wav(self, ctx: CallContext, state: RunState) -> Path:
        return await ctx.prompts.tts(self.text, self.voice, self.language)
