"""`hangup`: end the call."""

from __future__ import annotations

from typing import ClassVar

from dsl.context import CallContext
from dsl.verbs.base import Needs, RunState, Step, Verb, end


class Hangup(Verb):
    """End the call now (BYE, or a final response if it was never answered)."""

    verb: ClassVar[str] = "hangup"
    needs: ClassVar[Needs] = "any"

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        await ctx.leg.hangup()
        return end("hangup_verb")
