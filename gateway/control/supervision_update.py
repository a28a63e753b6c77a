"""A supervision's progress, from the bridge's home worker to the supervisor's registry (an
`Ask`): the supervisor's phone rings, answered (the tap is on), or the supervision is over
(its leg ended, the bridge ended, or it failed to start)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class SupervisionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["supervision_update"] = "supervision_update"
    supervision_id: str
    call_id: str
    state: Literal["ringing", "connected", "ended"]
    at: float | None = None  # connected: when the supervisor answered
    reason: str | None = None  # ended: supervisor_hangup, bridge_ended, busy, no_answer...
