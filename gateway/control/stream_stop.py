"""Stop a live call's stream fork(s) (`POST /v1/calls/{id}/stream` `{"action": "stop"}`).

`name` None stops every fork of the call. The worker answers how many it stopped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamStop(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["stream_stop"] = "stream_stop"
    call_id: str
    name: str | None = Field(None, min_length=1, max_length=128)
