"""End a live call: BYE when answered, CANCEL (outbound) or a final response (inbound) before."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Hangup(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["hangup"] = "hangup"
    call_id: str
