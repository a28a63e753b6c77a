"""supervisor -> worker: the whole of one room as that worker must mix it (declarative).

The worker makes its local part exactly this: its members (and their muted / hold flags), its
media links (to the hub, or on the hub one per other worker with members) with the peer's
address when known. It replies `{"links": [[peer, host, port], ...]}`: the local address of
each link, which the supervisor hands to the peer in its own sync. Members of this worker that
are no longer listed have left (`removed` says why); `ended` closes the room here. `notices`
are the room's status events since the last sync (delivered to the local participants that
subscribed), `beep` plays the join/leave beep to the local members.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class RoomMemberState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    call_id: str
    muted: bool = False
    hold: bool = False


class RoomLinkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    peer: int  # the worker at the other end
    host: str | None = None  # the peer link's address; None until the peer has opened it
    port: int | None = None


class RoomNoticeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event: Literal["start", "end", "join", "leave"]
    call_id: str = ""  # the participant it is about (join, leave)
    count: int = 0  # participants in the room after it


class RoomSync(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["room_sync"] = "room_sync"
    room_id: str
    name: str
    started: bool
    ended: bool = False
    members: list[RoomMemberState] = []
    links: list[RoomLinkSpec] = []
    removed: dict[str, str] = {}  # call_id -> why: left, kicked, ended, worker_lost
    notices: list[RoomNoticeSpec] = []
    beep: bool = False
