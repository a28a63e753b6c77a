"""End a dial leg (the home -> supervisor `Ask`, forwarded to the leg's worker as a `Request`;
in-process when the leg is on its home): CANCEL while it rings, BYE once answered. `reason`
says why, for the leg's final (`canceled` with it before answer, `completed` after)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

EndReason = Literal[
    "parent_hangup", "lost_race", "bridge_ended", "time_limit", "parent_lost", "supervision_ended"
]


class EndLeg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["dial_end"] = "dial_end"
    call_id: str  # the leg
    reason: EndReason
