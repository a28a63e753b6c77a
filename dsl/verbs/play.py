"""`play`: play an audio file fetched from a URL."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from dsl.context import CallContext
from dsl.verbs.base import Needs, PromptVerb, RunState, loop_field


class Play(PromptVerb):
    """Play the audio at `url` to the caller, `loop` times."""

    verb: ClassVar[str] = "play"
    needs: ClassVar[Needs] = "media"

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="Audio URL (WAV or MP3); relative URLs resolve against the document's URL.",
    )
    loop: int = loop_field()

    async def wav(self, ctx: CallContext, state: RunState) -> Path:
        return await ctx.prompts.audio(state.resolve(self.url))
