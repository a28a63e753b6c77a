"""Start a dial's child leg on this worker (supervisor -> worker `Request`), placed by the
supervisor for the bridge's home worker. The worker sends the INVITE (trying `targets` in
order on trunk-level failures, like an outbound call), tracks the leg as a call of its own and
replies once it is on the wire: `{"link": [host, port] | None}` (its media link end, made and
connected to `home_link` when the home is another worker)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from gateway.control.originate import Destination


class LegTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    trunk: str | None = None  # None: a SIP URI, sent through the front (outbound proxy)


class StartLeg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["dial_start"] = "dial_start"
    leg: dict[str, Any]  # CallIdentity.to_wire()
    targets: list[LegTarget]
    caller_id: str
    timeout_s: float
    events: Destination | None = None
    home_worker: int  # where the bridge is: progress goes there (through the supervisor)
    home_link: tuple[str, int] | None = None  # set when home_worker is another worker
