"""home node -> node: the whole of one room as that node's part must hold it (declarative).

The home's registry keeps a node's participants as if the node were one of its workers; this
is that "worker's" sync, over the cluster API (POST /cluster/v1/rooms/part). The node makes its
part exactly this: its members (muted / hold), the links its hub must hold (`links`: a peer key,
"<home>:<worker>" for a home worker or a node id, with the peer end's address when known),
who was removed and why, the room's status events since the last sync, a beep. It answers
`{"links": [[key, host, port], ...]}`: the address of its hub's end of each link.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from gateway.control.room_sync import RoomMemberState, RoomNoticeSpec


class RoomPartLink(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str  # the peer: "<node>:<worker>" (a worker of the home) or "<node>" (a node's hub)
    host: str | None = None
    port: int | None = None


class RoomPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    room_id: str
    workspace_id: str
    name: str
    started: bool
    ended: bool = False
    members: list[RoomMemberState] = []
    links: list[RoomPartLink] = []
    removed: dict[str, str] = {}  # call_id -> why: left, kicked, ended
    notices: list[RoomNoticeSpec] = []
    beep: bool = False
