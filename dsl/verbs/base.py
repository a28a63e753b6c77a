"""What every verb shares: the pydantic base, its precondition, and the Step it returns.

A verb is a pydantic model (its parameters, defaults and docs) plus `run`, its behaviour
against an abstract `CallContext`. The interpreter resolves the precondition (`needs`) before
`run`, so no verb answers the call by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urljoin

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from dsl.context import CallContext, FetchedDocument

log = logging.getLogger(__name__)

Needs = Literal["media", "unanswered", "any"]
EndedBy = Literal["hangup_verb", "document_end", "reject", "caller", "verb_unsupported"]

# Keys that are legal DTMF; "" means "no finish key".
DTMF_KEY_PATTERN = r"^[0-9*#]?$"
DTMF_KEYS_PATTERN = r"^[0-9*#]+$"


@dataclass(frozen=True)
class RunIssue:
    """Something that went wrong while running (the call went on, or ended cleanly)."""

    code: str  # a MediaError code, "verb_unsupported", "reject_after_answer", ...
    path: str  # where in the current document, e.g. "actions[2].say"
    message: str


@dataclass
class RunState:
    """Per-call interpreter state a verb may read (and add issues to)."""

    document_url: str
    path: str = ""  # the running verb's path, for issues and logs
    issues: list[RunIssue] = field(default_factory=list)
    call_id: str = ""  # for logs
    on_skip: Callable[[str, str], None] | None = None  # (verb, reason) of a skipped action

    def resolve(self, url: str) -> str:
        """Relative URLs ("/voice/menu") are relative to the document that holds them."""
        return urljoin(self.document_url, url)

    def note(self, code: str, message: str, path: str | None = None) -> None:
        issue = RunIssue(code, self.path if path is None else path, message)
        log.warning("call %s: %s: %s: %s", self.call_id, issue.path, code, message)
        self.issues.append(issue)

    def skipped(self, verb: str, code: str, message: str, path: str | None = None) -> None:
        """An action (or nested prompt) skipped because its media failed; the call goes on."""
        self.note(code, f"skipped: {message}", path)
        if self.on_skip is not None:
            self.on_skip(verb, code)


@dataclass(frozen=True)
class Step:
    """What happens after a verb: go on, replace the remaining document, or end the run."""

    kind: Literal["next", "replace", "end"]
    document: FetchedDocument | None = None  # for "replace"
    redirect: bool = False  # the replacement came from `redirect` (counts towards the loop cap)
    ended_by: EndedBy | None = None  # for "end"
    reject_code: int | None = None


NEXT = Step("next")


def replace_with(document: FetchedDocument, *, redirect: bool = False) -> Step:
    return Step("replace", document=document, redirect=redirect)


def end(ended_by: EndedBy, *, reject_code: int | None = None) -> Step:
    return Step("end", ended_by=ended_by, reject_code=reject_code)


def is_empty_reply(body: Any) -> bool:
    """A reply with no actions (204, `{}`, `{"actions": []}`) means "carry on"."""
    if body is None or body in ("", {}, []):
        return True
    return isinstance(body, dict) and set(body) == {"actions"} and body["actions"] == []


def reply_step(reply: FetchedDocument) -> Step:
    """A non-empty reply replaces what remains of the document; an empty one lets it go on."""
    return NEXT if is_empty_reply(reply.body) else replace_with(reply)


def extension(default: Any, *, description: str, **kwargs: Any) -> Any:
    """A parameter the SDK does not write; it must never change what an SDK document means."""
    return Field(
        default, description=description, json_schema_extra={"x-extension": True}, **kwargs
    )


def loop_field() -> Any:
    return Field(1, ge=0, le=1000, description="How many times to play it; 0 and 1 both mean once.")


def _schema_extra(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    if issubclass(cls, Verb) and getattr(cls, "verb", None):
        schema["x-verb"] = cls.verb
        schema["x-needs"] = cls.needs
        if cls.is_extension:
            schema["x-extension"] = True


class Verb(BaseModel):
    """Base of every verb model: camelCase names, strict JSON types, unknown parameters refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra=_schema_extra,
    )

    verb: ClassVar[str]  # the key in the document: "say", "getDigits", ...
    needs: ClassVar[Needs]  # precondition the interpreter resolves before `run`
    is_extension: ClassVar[bool] = False  # a whole verb the SDK does not write (pause)
    nested_verbs: ClassVar[tuple[str, ...]] = ()  # verbs allowed in its `nested` list
    must_be_last: ClassVar[bool] = False  # nothing may follow it in a document (aiAgent)
    # An `interrupt("end")` lets it run on until the gateway's hangup ends it (record: what was
    # recorded is kept and reported), instead of cancelling it like every other verb.
    ends_with_call: ClassVar[bool] = False

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        raise NotImplementedError


class PromptVerb(Verb):
    """A verb that plays one WAV `loop` times (say, play); also usable nested in getDigits."""

    if TYPE_CHECKING:
        loop: int  # each subclass declares it last, so docs list it after its own parameters

    async def wav(self, ctx: CallContext, state: RunState) -> Path:
        raise NotImplementedError

    async def perform(
        self, ctx: CallContext, state: RunState, stop: asyncio.Event | None = None
    ) -> bool:
        """Play the prompt; False when `stop` cut it short (barge-in)."""
        if stop is not None and stop.is_set():
            return False
        wav = await self.wav(ctx, state)
        for _ in range(max(1, self.loop)):
            if not await ctx.leg.play(wav, stop=stop):
                return False
        return True

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        await self.perform(ctx, state)
        return NEXT
