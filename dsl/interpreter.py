"""Runs Voice Actions documents against one call, top to bottom, until the call ends.

The interpreter owns what no single verb should: preconditions (the implicit answer before
the first verb that needs media; `reject` only before answer), replacing the remaining
document (getDigits/record replies, redirect), the redirect loop cap, commands from outside
(`interrupt`), and how a run ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from dsl.context import CallContext, CallEnded, FetchedDocument, MediaError, VoiceAppError
from dsl.document import Document, parse_document
from dsl.errors import DocumentError, VerbUnsupported
from dsl.verbs import AiAgent, Dial, Redirect, Verb
from dsl.verbs.base import NEXT, RunIssue, RunState, Step, end, is_empty_reply, replace_with

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10  # in a row, without a media verb in between
MAX_DIALS = 10  # per call: a voice app that answers every dial's callback with another dial
# per call: a voice app that answers every aiAgent callback (onUnavailable "callback" while the
# runtime is down, an agent that hands over at once) with another aiAgent
MAX_AI_AGENTS = 10

T = TypeVar("T")

# How a run ended: a verb's EndedBy, or "api_hangup" (an `interrupt("end")`: the gateway ends
# the call itself).
RunEnd = Literal[
    "hangup_verb", "document_end", "reject", "caller", "verb_unsupported", "api_hangup"
]


@dataclass(frozen=True)
class Fetch:
    """An interrupt's replacement to request from the voice app, like the `redirect` verb does
    (same client, same call state; a relative URL resolves against the current document)."""

    url: str
    method: Literal["GET", "POST"] = "POST"


END: Literal["end"] = "end"
# What `interrupt` takes: an inline document, one to fetch, or END (stop; no more documents).
Replacement = FetchedDocument | Fetch | Literal["end"]


class _Interrupted:
    """Marker: an interrupt stopped what was awaited."""


INTERRUPTED = _Interrupted()


@dataclass
class RunResult:
    """How a run ended, and what went wrong along the way without stopping the call."""

    ended_by: RunEnd
    reject_code: int | None = None  # the SIP code sent when ended_by == "reject"
    errors: list[RunIssue] = field(default_factory=list)  # skipped verbs, unsupported verbs...
    documents: int = 0  # documents run: the first plus every replacement
    interrupts: int = 0  # interrupts taken (each stopped the current verb or document)


class Interpreter:
    """One call's interpreter: `await Interpreter(ctx).run(first_document)`.

    Raises `VoiceAppError` when a document is invalid (`document_invalid`), a fetch fails
    (the voice app client's codes) or redirects loop (`redirect_loop`); the call is then left
    as it is for the caller of `run` to end. Everything else ends in a `RunResult`.

    `interrupt` (from the gateway, on the event loop's thread) stops the current verb at once
    and replaces the document, or ends the run.
    """

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self._redirects = 0
        self._documents = 0
        self._interrupts = 0
        self._pending: Replacement | None = None
        # Resolved by `interrupt`, dropped when the interrupt is taken: what every awaited step
        # waits on beside itself (a plain future: no task per step). Made on first use.
        self._wake: asyncio.Future[None] | None = None
        self._ending = False  # END was asked: final, later interrupts are refused
        self._done = False
        self._dials = 0
        self._agents = 0

    def interrupt(self, replacement: Replacement) -> bool:
        """Stop the current verb and run `replacement` instead (END: stop, run nothing more).

        Never lost: one that arrives between verbs, while a document is being fetched or
        before `run` starts is taken at the next step; of several not yet taken the last
        wins. END is final (the gateway hangs the call up itself): later interrupts are
        refused. Returns False, doing nothing, once the run is over, the call has ended, or
        after END.

        The stopped verb cleans up (no prompt left playing, in-band DTMF detection off) and
        reports nothing: an interrupted getDigits posts no Digits, a reply in flight is
        dropped, an interrupted `record` is discarded (file deleted, no event, no request).
        One exception: on END a running `record` is not cancelled; the gateway's hangup ends
        it, and it is reported as after any hangup (kept, `call.recording.ready`, `action`).

        Not a redirect: it neither counts towards nor resets the redirect loop cap.
        """
        if self._done or self._ending or self.ctx.leg.ended:
            return False
        if replacement == END:
            self._ending = True
        self._pending = replacement
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return True

    async def run(self, first: FetchedDocument | Fetch) -> RunResult:
        """Run `first` (a document, or one to fetch: then an interrupt during that first fetch
        cancels it too) and whatever replaces it, until the call or the documents end."""
        state = RunState(
            document_url=first.url, call_id=self.ctx.leg.call_id, on_skip=self.ctx.on_skip
        )
        reject_code: int | None = None
        try:
            ended_by, reject_code = await self._run(first, state)
        except CallEnded:
            log.debug("call %s: ended by the far end at %s", self.ctx.leg.call_id, state.path)
            ended_by = "api_hangup" if self._ending else "caller"
        finally:
            self._done = True
        return RunResult(ended_by, reject_code, state.issues, self._documents, self._interrupts)

    async def _run(
        self, initial: FetchedDocument | Fetch, state: RunState
    ) -> tuple[RunEnd, int | None]:
        source: FetchedDocument | Fetch = initial
        first = True  # the document given to `run`, from the voice app
        while True:
            if self._pending is not None:
                command = self._take()
                if command == END:
                    return "api_hangup", None
                first = False
                source = command
            if isinstance(source, Fetch):
                url = state.resolve(source.url)
                got = await self._until_interrupted(self.ctx.app.fetch(url, source.method))
                if isinstance(got, _Interrupted):
                    continue
                source = got
            document = self._parse(source)
            if not document.actions and first:
                # Not a rejection: the app gave nothing to run. The session answers 500.
                raise VoiceAppError(
                    "document_empty", f"the document from {source.url} has no actions"
                )
            first = False
            self._documents += 1
            state.document_url = source.url
            step = await self._run_document(document, state)
            if isinstance(step, _Interrupted):
                continue
            if step.kind == "end":
                assert step.ended_by is not None
                ended: RunEnd = step.ended_by
                if ended == "caller" and self._ending:
                    ended = "api_hangup"  # the hangup that ended it was the gateway's
                return ended, step.reject_code
            if step.kind == "next":  # fell off the end of the document
                after = await self._next_document()
                if isinstance(after, _Interrupted):
                    continue
                if after is None:
                    await self.ctx.leg.hangup()
                    return "document_end", None
                source = after
                continue
            assert step.document is not None
            if step.redirect and self._pending is None:
                self._redirects += 1
            source = step.document

    def _take(self) -> Replacement:
        command, self._pending = self._pending, None
        assert command is not None
        self._wake = None
        self._interrupts += 1
        log.info("call %s: interrupted (%s)", self.ctx.leg.call_id, _describe(command))
        return command

    async def _next_document(self) -> FetchedDocument | _Interrupted | None:
        """What runs after a document ends: the context's source of documents (MCP control)
        if it has one, else nothing (the call is hung up)."""
        if self.ctx.next_document is None:
            return None
        return await self._until_interrupted(self.ctx.next_document())

    def _parse(self, fetched: FetchedDocument) -> Document:
        try:
            return parse_document(fetched.body)
        except DocumentError as err:
            log.warning("call %s: invalid document from %s", self.ctx.leg.call_id, fetched.url)
            raise VoiceAppError("document_invalid", "; ".join(map(str, err.errors))) from err

    async def _run_document(self, document: Document, state: RunState) -> Step | _Interrupted:
        for i, verb in enumerate(document.actions):
            if self._pending is not None:
                return INTERRUPTED
            state.path = f"actions[{i}].{verb.verb}"
            step = await self._until_interrupted(
                self._run_verb(verb, state), ends_with_call=verb.ends_with_call
            )
            if isinstance(step, _Interrupted) or step.kind != "next":
                return step
        if document.actions and isinstance(document.actions[-1], Dial):
            return await self._after_dial(state)
        return NEXT

    async def _after_dial(self, state: RunState) -> Step | _Interrupted:
        """A dial ended its document: the voice callback URL says what comes next (POSTed
        with DialCallStatus & co.); an empty reply (204, `{}`) ends the call like a document
        end."""
        url = state.resolve(self.ctx.voice_callback_url)
        got = await self._until_interrupted(self.ctx.app.fetch(url, "POST", self.ctx.params))
        if isinstance(got, _Interrupted):
            return got
        return NEXT if is_empty_reply(got.body) else replace_with(got)

    async def _until_interrupted(
        self, aw: Awaitable[T], *, ends_with_call: bool = False
    ) -> T | _Interrupted:
        """Await `aw` as a task, cancelled (and awaited) the moment an interrupt arrives.

        With `ends_with_call` an END does not cancel it: the hangup that follows ends it.
        """
        task = asyncio.ensure_future(aw)
        wake = self._wake
        if wake is None:
            wake = self._wake = asyncio.get_running_loop().create_future()
            if self._pending is not None:
                wake.set_result(None)
        try:
            waiters: set[asyncio.Future[Any]] = {task, wake}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                if ends_with_call and self._pending == END:
                    await asyncio.wait({task})  # the gateway's hangup ends it
                    _discard(task)
                else:
                    await _cancel(task)
                return INTERRUPTED
        except BaseException:
            await _cancel(task)  # our own run was cancelled: take the verb down with it
            raise
        return task.result()

    async def _run_verb(self, verb: Verb, state: RunState) -> Step:
        leg = self.ctx.leg
        if verb.needs == "media":
            if not leg.answered:
                log.debug("call %s: answering for %s", leg.call_id, state.path)
                await leg.answer()
            self._redirects = 0
        elif verb.needs == "unanswered" and leg.answered:
            # Nothing left to refuse: ending the call is the closest to what the app asked.
            state.note("reject_after_answer", "the call was already answered; hung up instead")
            await leg.hangup()
            return end("hangup_verb")
        if isinstance(verb, Dial):
            self._dials += 1
            if self._dials > MAX_DIALS:
                raise VoiceAppError(
                    "dial_loop", f"{state.path}: more than {MAX_DIALS} dials in one call"
                )
        if isinstance(verb, AiAgent):
            self._agents += 1
            if self._agents > MAX_AI_AGENTS:
                raise VoiceAppError(
                    "ai_agent_loop", f"{state.path}: more than {MAX_AI_AGENTS} aiAgent in one call"
                )
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


async def _cancel(task: asyncio.Future[T]) -> None:
    """Cancel `task` and wait until it has cleaned up (its `finally` blocks ran)."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    _discard(task)


def _discard(task: asyncio.Future[T]) -> None:
    """Drop a stopped task's outcome (marking an exception retrieved): it was replaced."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("interrupted task ended with %r", exc)


def _describe(command: Replacement) -> str:
    if command == END:
        return "end"
    if isinstance(command, Fetch):
        return f"fetch {command.method} {command.url}"
    return f"document from {command.url}"
