"""worker -> supervisor: put a call in a conference room (created on first entry).

Answered with `{room_id, started, count}`, or refused with `room_full` (maxParticipants).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class RoomJoin(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["room_join"] = "room_join"
    call_id: str
    workspace_id: str
    name: str
    muted: bool = False
    beep: bool = False
    start_on_enter: bool = True
    end_on_exit: bool = False
    record: bool = False  # its worker records the room's mix for this call
    max_participants: int = 0  # 0: the default (registry.DEFAULT_MAX_PARTICIPANTS)
    flags: list[str] = []
