"""Start supervising a bridged call (supervisor -> the bridge's home worker `Request`): the
home places the supervisor's leg like a dial leg (PlaceLeg) and joins it to its bridge in
`mode`. Replies `{"leg_id"}` once the leg is asked for; its progress comes back as
`SupervisionUpdate` asks. Refused with `not_bridged` when the call has no answered bridge."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from gateway.supervision.request import Announce, Mode


class SuperviseStart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["supervise_start"] = "supervise_start"
    call_id: str  # the bridge's caller (its home worker runs the bridge)
    supervision_id: str
    kind: Literal["number", "sip", "client"]
    target: str  # E.164, or a sip: URI
    mode: Mode
    announce: Announce = "none"
    timeout_s: float = 30.0  # the supervisor's phone rings this long
