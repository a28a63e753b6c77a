"""A dial leg's progress, from the leg's worker to the bridge's home: an `Ask` to the
supervisor, which forwards it to the home as a `Request` (the same model both ways). A leg on
its home worker reports in-process. `ended` is sent once, after the leg's final event is
written (or by the supervisor, `worker_lost`, when the leg's worker died)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class LegProgress(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["dial_progress"] = "dial_progress"
    call_id: str  # the leg
    parent_call_id: str
    state: Literal["ringing", "early", "answered", "ended"]
    sip_code: int | None = None  # ringing: the 18x; ended: the final code (200 answered)
    status: str | None = None  # ended: the leg's final status (completed, busy, no_answer...)
    reason: str | None = None  # ended: the final's reason (callee_busy, worker_lost...)
    answered_at: float | None = None
    ended_at: float | None = None
