"""Actions for a call under MCP control, sent by its controller (`POST /v1/calls/{id}/respond`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Respond(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["respond"] = "respond"
    call_id: str
    actions: list[dict[str, Any]]
