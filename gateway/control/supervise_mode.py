"""Change what a connected supervisor hears and who hears it (supervisor -> home `Request`);
takes effect on the home's bridge at once, without redialling."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from gateway.supervision.request import Mode


class SuperviseMode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["supervise_mode"] = "supervise_mode"
    call_id: str
    supervision_id: str
    mode: Mode
