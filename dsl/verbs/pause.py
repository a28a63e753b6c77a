"""`pause` (extension): silence for a while."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from dsl.context import CallContext
from dsl.verbs.base import NEXT, Needs, RunState, Step, Verb


class Pause(Verb):
    """Wait `length` seconds in silence (extension: the SDK does not write it)."""

    verb: ClassVar[str] = "pause"
    needs: ClassVar[Needs] = "media"
    is_extension: ClassVar[bool] = True

    length: float = Field(1, ge=0, le=3600, description="Seconds of silence.")

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        await ctx.leg.wait(self.length)
        return NEXT
