"""`aiAgent`: hand the call to a voice AI agent (SDK 0.5.0; not yet runnable)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from dsl.context import CallContext
from dsl.errors import VerbUnsupported
from dsl.verbs.base import Needs, RunState, Step, Verb


class _Part(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", strict=True, frozen=True)


class Voicemail(_Part):
    greeting_text: str | None = Field(None, max_length=4000, description="Greeting to say.")
    greeting_play_url: str | None = Field(None, max_length=2048, description="Greeting to play.")
    greeting_voice: Literal["man", "woman"] | None = Field(None, description="Greeting voice.")
    max_length: float | None = Field(None, ge=0, le=14400, description="Longest message (s).")
    beep: bool | None = Field(None, description="Beep before recording.")


class Forward(_Part):
    destinations: list[str] = Field(
        min_length=1, max_length=10, description="E.164, client:<name> or a 4-digit extension."
    )
    sequential: bool | None = Field(None, description="Ring one after another.")
    first_answer_wins: bool | None = Field(None, description="Bridge the first to answer.")
    ring_timeout: float | None = Field(None, gt=0, le=600, description="Seconds to ring.")
    caller_id: str | None = Field(None, max_length=64, description="Caller ID presented.")
    voicemail: Voicemail | None = Field(None, description="Voicemail when nobody answers.")


class Handover(_Part):
    callback_url: str | None = Field(None, max_length=2048, description="URL to hand back to.")
    forward: Forward | None = Field(None, description="Forward the caller.")
    voicemail: Voicemail | None = Field(None, description="Take a voicemail.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Handover:
        if sum(x is not None for x in (self.callback_url, self.forward, self.voicemail)) != 1:
            raise PydanticCustomError(
                "aiAgent.handover", "exactly one of callbackUrl, forward or voicemail is required"
            )
        return self


class AiAgent(Verb):
    """Hand the call to the voice AI agent `agentId` (expanded into a `stream` fork).

    Must be the last action; a say/play prologue may precede it. Validated now; running it
    ends the call with `call.failed` `verb_unsupported` until voice AI lands.
    """

    verb: ClassVar[str] = "aiAgent"
    needs: ClassVar[Needs] = "media"
    must_be_last: ClassVar[bool] = True

    agent_id: str = Field(min_length=1, max_length=128, description="The agent to run.")
    revision: str | int | None = Field(None, description="Agent revision; default the latest.")
    variables: dict[str, Any] | None = Field(None, description="Variables for the agent.")
    handover: Handover | None = Field(None, description="Where the call goes after the agent.")
    on_unavailable: Literal["hangup", "voicemail", "forward", "callback"] = Field(
        "hangup", description="What happens when the agent is unavailable."
    )
    voicemail: Voicemail | None = Field(None, description="Voicemail for onUnavailable.")
    forward: Forward | None = Field(None, description="Forward target for onUnavailable.")

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        raise VerbUnsupported(self.verb)
