"""`reject`: refuse an unanswered call with a SIP final response."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dsl.context import CallContext
from dsl.verbs.base import Needs, RunState, Step, Verb, end

SIP_CODES: dict[str, int] = {"rejected": 603, "busy": 486}  # 603 Decline, 486 Busy Here


class Reject(Verb):
    """Refuse the call without answering it (no charge to the caller).

    After the call was answered there is nothing to refuse: the interpreter hangs up instead
    and notes `reject_after_answer` in the run result.
    """

    verb: ClassVar[str] = "reject"
    needs: ClassVar[Needs] = "unanswered"

    reason: Literal["rejected", "busy"] = Field(
        "rejected", description='"rejected" answers SIP 603 Decline, "busy" 486 Busy Here.'
    )

    @property
    def sip_code(self) -> int:
        return SIP_CODES[self.reason]

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        await ctx.leg.reject(self.sip_code)
        return end("reject", reject_code=self.sip_code)
