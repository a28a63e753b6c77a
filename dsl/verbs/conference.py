"""`conference`: put the caller in a named conference room (not yet runnable)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from dsl.context import CallContext
from dsl.errors import VerbUnsupported
from dsl.verbs.base import DTMF_KEY_PATTERN, Needs, RunState, Step, Verb

# A space-separated subset of the four conference events.
STATUS_EVENTS_PATTERN = r"^\s*(start|end|join|leave)(\s+(start|end|join|leave))*\s*$"


class Conference(Verb):
    """Join the caller to the conference `name`, creating it on first entry.

    Validated now; running it ends the call with `verb_unsupported` until conferencing lands.
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
        raise VerbUnsupported(self.verb)
