"""Place a dial's child leg (worker -> supervisor `Ask`): the bridge's home worker asks, the
supervisor picks the trunks (it holds their counters) and the worker (the home when it has a
free slot), and starts the leg there with `StartLeg`. The reply says where the leg went:
`{"worker": N, "link": [host, port] | None}`; `link` is the leg worker's media link end
when the leg is on another worker (the home connects its own end, `home_link`, to it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from gateway.control.originate import Destination


class PlaceLeg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["dial_place"] = "dial_place"
    leg: dict[str, Any]  # the child's CallIdentity.to_wire() (parent_call_id set)
    kind: Literal["number", "sip", "client"]
    target: str  # E.164, a sip: URI dialled as is (through the front), or a browser's name
    caller_id: str  # the From user part
    timeout_s: float  # ring time before the leg CANCELs itself (no_answer)
    events: Destination | None = None  # the parent's events destination
    home_link: tuple[str, int] | None = None  # the home's media link end, for a remote leg
