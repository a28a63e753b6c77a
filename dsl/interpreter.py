"""Runs Voice Actions documents against one call, top to bottom, until the call ends.

The interpreter owns what no single verb should: preconditions (the implicit answer before
the first verb that needs media; `reject` only before answer), replacing the remaining
document (getDigits/record replies, redirect), the redirect loop cap, and how a run ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dsl.context import CallContext, CallEnded, FetchedDocument, MediaError, VoiceAppError
from dsl.document import Document, parse_document
from dsl.errors import DocumentError, VerbUnsupported
from dsl.verbs import Redirect, Verb
from dsl.verbs.base import NEXT, EndedBy, RunIssue, RunState, Step, end

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10  # in a row, without a media verb in between


@dataclass
class RunResult:
    """How a run ended, and what went wrong along the way without stopping the call."""

    ended_by: EndedBy  # hangup_verb | document_end | reject | caller | verb_unsupported
    reject_code: int | None = None  # the SIP code sent when ended_by == "reject"
    errors: list[RunIssue] = field(default_factory=list)  # skipped verbs, unsupported verbs...
    documents: int = 0  # documents run: the first plus every replacement


class Interpreter:
    """One call's interpreter: `await Interpreter(ctx).run(first_document)`.

    Raises `VoiceAppError` when a document is invalid (`document_invalid`), a fetch fails
    (the voice app client's codes) or redirects loop (`redirect_loop`); the call is then left
    as it is for the caller of `run` to end. Everything else ends in a `RunResult`.
    """

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self._redirects = 0
        self._documents = 0

    async def run(self, first: FetchedDocument) -> RunResult:
        state = RunState(
            document_url=first.url, call_id=self.ctx.leg.call_id, on_skip=self.ctx.on_skip
        )
        reject_code: int | None = None
        try:
            ended_by, reject_code = await self._run(first, state)
        except CallEnded:
            log.info("call %s: ended by the far end at %s", self.ctx.leg.call_id, state.path)
            ended_by = "caller"
        return RunResult(ended_by, reject_code, state.issues, self._documents)

    async def _run(self, fetched: FetchedDocument, state: RunState) -> tuple[EndedBy, int | None]:
        while True:
            document = self._parse(fetched)
            if not document.actions and self._documents == 0:
                # Not a rejection: the app gave nothing to run. The session answers 500.
                raise VoiceAppError(
                    "document_empty", f"the document from {fetched.url} has no actions"
                )
            self._documents += 1
            state.document_url = fetched.url
            step = await self._run_document(document, state)
            if step.kind == "end":
                assert step.ended_by is not None
                return step.ended_by, step.reject_code
            if step.kind == "next":  # fell off the end of the document
                await self.ctx.leg.hangup()
                return "document_end", None
            assert step.document is not None
            if step.redirect:
                self._redirects += 1
            fetched = step.document

    def _parse(self, fetched: FetchedDocument) -> Document:
        try:
            return parse_document(fetched.body)
        except DocumentError as err:
            log.warning("call %s: invalid document from %s", self.ctx.leg.call_id, fetched.url)
            raise VoiceAppError("document_invalid", "; ".join(map(str, err.errors))) from err

    async def _run_document(self, document: Document, state: RunState) -> Step:
        for i, verb in enumerate(document.actions):
            state.path = f"actions[{i}].{verb.verb}"
            step = await self._run_verb(verb, state)
            if step.kind != "next":
                return step
        return NEXT

    async def _run_verb(self, verb: Verb, state: RunState) -> Step:
        leg = self.ctx.leg
        if verb.needs == "media":
            if not leg.answered:
                log.info("call %s: answering for %s", leg.call_id, state.path)
                await leg.answer()
            self._redirects = 0
        elif verb.needs == "unanswered" and leg.answered:
            # Nothing left to refuse: ending the call is the closest to what the app asked.
            state.note("reject_after_answer", "the call was already answered; hung up instead")
            await leg.hangup()
            return end("hangup_verb")
        if isinstance(verb, Redirect) and self._redirects >= MAX_REDIRECTS:
            raise VoiceAppError(
                "redirect_loop",
                f"{state.path}: more than {MAX_REDIRECTS} redirects in a row without a "
                "say, play, getDigits, record or other media action",
            )
        log.debug("call %s: running %s", leg.call_id, state.path)
        try:
            return await verb.run(self.ctx, state)
        except MediaError as err:  # a prompt that cannot play is skipped; the call goes on
            state.skipped(verb.verb, err.code, err.message)
            return NEXT
        except VerbUnsupported as err:
            # Never a silent success: the call fails (before answer a final code, else BYE).
            raise VoiceAppError("verb_unsupported", f"{state.path}: {err}") from err
