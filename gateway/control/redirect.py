"""Replace a live call's document: the current verb stops, the new document runs.

Exactly one of `url` (fetched by the call like any voice callback) or `actions` (an inline
document, validated by the API before it is sent).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator


class Redirect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["redirect"] = "redirect"
    call_id: str
    url: str | None = None
    method: Literal["POST", "GET"] = "POST"
    actions: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Redirect:
        if (self.url is None) == (self.actions is None):
            raise ValueError("give exactly one of url or actions")
        return self
