"""End a supervision (supervisor -> home `Request`): the supervisor's leg is CANCELed while it
rings, BYEd once connected; the bridge goes on."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class SuperviseStop(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["supervise_stop"] = "supervise_stop"
    call_id: str
    supervision_id: str
