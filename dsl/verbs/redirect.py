"""`redirect`: fetch another document; it replaces whatever remains of this one."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dsl.context import CallContext
from dsl.verbs.base import Needs, RunState, Step, Verb, replace_with


class Redirect(Verb):
    """Fetch a document from `url` and continue with it; the rest of this document is dropped."""

    verb: ClassVar[str] = "redirect"
    needs: ClassVar[Needs] = "any"

    url: str = Field(
        min_length=1,
        max_length=2048,
        description='Absolute, or relative to the current document\'s URL (e.g. "/voice/menu").',
    )
    method: Literal["GET", "POST"] = Field("POST", description="HTTP method of the fetch.")

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        fetched = await ctx.app.fetch(state.resolve(self.url), self.method)
        # Even an empty reply replaces the rest: redirect is terminal, so the call then ends.
        return replace_with(fetched, redirect=True)
