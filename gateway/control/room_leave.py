"""worker -> supervisor: a call leaves its room (its verb ended: hangup, redirect, kick seen).

Idempotent; answered with `{count}` (participants left in the room).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class RoomLeave(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["room_leave"] = "room_leave"
    call_id: str
    room_id: str
