"""MCP control: a call (`"control": "mcp"` on create) that asks its controller what to do next.

On answer `opening_actions` run (or, without them, the controller is asked at once). Then each
time the running actions end, one *cycle*: the call's state is POSTed (JSON, signed like events)
to the control URL and the call waits up to `control_timeout_ms` for actions, which come either
as that POST's reply (`{"actions": [...]}`; 204 or an empty body or `{"actions": []}` mean "I
will answer through respond") or through `POST /v1/calls/{id}/respond` (`respond` here),
whichever comes first. Meanwhile `hold_audio_url` plays in a loop; it stops the moment actions
arrive. A cycle without actions in time, or whose POST fails (non-2xx, unreachable, not JSON,
an invalid document), is a timeout; the next cycle starts at once with the same state and
`reason: "timeout"`; after two in a row `fallback_actions` run (default: hang up).

Results of getDigits and record reach the controller too: as this call's `VoiceApp`, fetches to
the call's callback URL (where those verbs send `Digits`, `RecordingUrl`...) become a cycle
whose state carries them, and its actions replace the rest of the document, exactly as a voice
app's reply would. Other URLs (a `redirect` verb, a record `action`) go to the `inner` voice app.

A `respond` while no cycle waits is kept for the next cycle (a later one replaces it) and
answers it at once; that cycle's state is still POSTed, so the controller sees every state, but
its reply is ignored. To change what runs *now*, a controller uses `POST /v1/calls/{id}/redirect`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal

import aiohttp

from dsl.context import (
    CallLeg,
    FetchedDocument,
    MediaError,
    Prompts,
    VoiceApp,
    VoiceAppError,
)
from dsl.document import check_depth, parse_document
from dsl.errors import DocumentError
from dsl.interpreter import Fetch
from gateway.control.originate import Mcp
from gateway.events.signing import SIGNATURE_HEADER, sign

__all__ = ["MCP_CALLBACK_URL", "McpController"]

log = logging.getLogger(__name__)

USER_AGENT = "Sautikit-Gateway/0.1"
# The callback URL to give an MCP call's CallContext when it has no voice app of its own:
# getDigits/record results sent there become cycles (any URL works; this one says what it is).
MCP_CALLBACK_URL = "mcp:results"
DEFAULT_FALLBACK: list[dict[str, Any]] = [{"hangup": {}}]
MAX_REPLY_BYTES = 65536
TIMEOUTS_BEFORE_FALLBACK = 2

Reason = Literal["answered", "document_end", "digits", "record", "request", "timeout"]


class _Wait:
    """The controller's POST reply said "no actions here; wait for respond"."""


class _Failed:
    """The POST failed: this cycle counts as a timeout."""


WAIT, FAILED = _Wait(), _Failed()


class McpController:
    """One MCP-controlled call. Wire it as the CallContext's `next_document` (and `app`).

    `call_fields` is kept by reference (the gateway updates `callStatus` in place), like the
    voice app client's; its keys (callId, from, to, direction, callStatus, clientRequestId...)
    go into every state POST, and win over verb results of the same name.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        control_url: str,
        secret: str,
        call_fields: Mapping[str, str],
        *,
        leg: CallLeg,
        prompts: Prompts,
        control_timeout_ms: int = 10000,
        hold_audio_url: str | None = None,
        opening_actions: list[dict[str, Any]] | None = None,
        fallback_actions: list[dict[str, Any]] | None = None,
        callback_url: str = MCP_CALLBACK_URL,
        inner: VoiceApp | None = None,
        hold_grace_s: float = 0.3,
    ) -> None:
        self._session = session
        self._url = control_url
        self._secret = secret
        self._call_fields = call_fields
        self._leg = leg
        self._prompts = prompts
        self._timeout_s = control_timeout_ms / 1000
        self._hold_url = hold_audio_url
        self._opening = opening_actions
        self._fallback = DEFAULT_FALLBACK if fallback_actions is None else fallback_actions
        self.callback_url = callback_url
        self._inner = inner
        # Replies that come fast are not preceded by a blip of hold audio.
        self._hold_grace_s = hold_grace_s
        self.cycle = 0  # cycles started (the `cycle` of the last state POSTed)
        self.fallbacks = 0  # times fallback_actions ran
        self._waiter: asyncio.Future[list[dict[str, Any]]] | None = None
        self._queued: list[dict[str, Any]] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __repr__(self) -> str:  # never show the secret
        return f"McpController(callId={self._call_fields.get('callId')!r}, cycle={self.cycle})"

    @classmethod
    def for_call(
        cls,
        session: aiohttp.ClientSession,
        mcp: Mcp,
        call_fields: Mapping[str, str],
        *,
        leg: CallLeg,
        prompts: Prompts,
        inner: VoiceApp | None = None,
        callback_url: str = MCP_CALLBACK_URL,
    ) -> McpController:
        """From the originate op's `mcp` options."""
        return cls(
            session,
            mcp.control_url,
            mcp.control_secret,
            call_fields,
            leg=leg,
            prompts=prompts,
            control_timeout_ms=mcp.control_timeout_ms,
            hold_audio_url=mcp.hold_audio_url,
            opening_actions=mcp.opening_actions,
            fallback_actions=mcp.fallback_actions,
            callback_url=callback_url,
            inner=inner,
        )

    # -- what the gateway calls -------------------------------------------------------------
    def opening(self) -> FetchedDocument | Fetch:
        """What `Interpreter.run` starts with on answer: `opening_actions`, else a fetch of the
        callback URL from this controller (the first cycle, `reason: "answered"`), which an
        interrupt can cancel like any fetch."""
        if self._opening:
            return self._document(self._opening)
        return Fetch(self.callback_url)

    async def next_document(self) -> FetchedDocument:
        """CallContext.next_document: the running actions ended; ask for the next ones."""
        return await self._ask("document_end")

    def respond(self, actions: list[dict[str, Any]]) -> bool:
        """Actions from `POST /v1/calls/{id}/respond`: they answer the waiting cycle, or the next
        one when none waits. An empty list changes nothing. False once the call is over."""
        if self._closed or self._leg.ended:
            return False
        if not actions:
            return True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(list(actions))
        else:
            self._queued = list(actions)
        return True

    async def aclose(self) -> None:
        """The call is over: refuse later responds and stop state POSTs still in flight."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)

    # -- VoiceApp: getDigits / record results ----------------------------------------------
    async def fetch(
        self, url: str, method: str, extra: Mapping[str, str] | None = None
    ) -> FetchedDocument:
        if url != self.callback_url:
            if self._inner is None:
                raise VoiceAppError(
                    "url_forbidden", f"{url}: a call under MCP control has no voice app"
                )
            return await self._inner.fetch(url, method, extra)
        fields = dict(extra or {})
        if "RecordingUrl" in fields:
            reason: Reason = "record"
        elif "Digits" in fields:
            reason = "digits"
        elif self.cycle == 0:
            reason = "answered"  # `opening()` without opening actions
        else:
            reason = "request"
        return await self._ask(reason, fields)

    # -- cycles ------------------------------------------------------------------------------
    def _document(self, actions: list[dict[str, Any]]) -> FetchedDocument:
        # The control URL anchors relative URLs in the controller's actions.
        return FetchedDocument({"actions": actions}, self._url)

    async def _ask(self, reason: Reason, extra: Mapping[str, str] | None = None) -> FetchedDocument:
        """Cycles until actions come (or the fallback is due), with hold audio meanwhile.

        Cancelled (an interrupt replaced the document), it stops the hold audio and the POST.
        Raises CallEnded when the call ends while waiting.
        """
        if self._leg.ended:
            # Nothing can run any more (a recording handed over after the hangup): the
            # controller still learns the result; its reply has no call to run on.
            await self._post(self._state(reason, extra))
            return self._document([])
        stop = asyncio.Event()
        hold = asyncio.create_task(self._hold(stop)) if self._hold_url else None
        try:
            timeouts = 0
            while True:
                actions = await self._cycle(reason, extra)
                if actions is not None:
                    return self._document(actions)
                timeouts += 1
                if timeouts >= TIMEOUTS_BEFORE_FALLBACK:
                    self.fallbacks += 1
                    log.warning(
                        "call %s: no actions from the controller in %d cycles; fallback",
                        self._call_fields.get("callId"),
                        timeouts,
                    )
                    return self._document(self._fallback)
                reason = "timeout"
        finally:
            stop.set()
            if hold is not None:
                try:
                    await _stop(hold)
                except BaseException:
                    hold.cancel()
                    raise

    async def _cycle(
        self, reason: Reason, extra: Mapping[str, str] | None
    ) -> list[dict[str, Any]] | None:
        """One cycle: POST the state, wait for actions; None on timeout or a failed POST."""
        body = self._state(reason, extra)
        if self._queued is not None:
            actions, self._queued = self._queued, None
            self._spawn(self._post(body))  # the controller still sees the state
            return actions
        waiter: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        post = asyncio.ensure_future(self._post(body))
        deadline = asyncio.ensure_future(self._leg.wait(self._timeout_s))  # CallEnded if it ends
        waiting: set[asyncio.Future[Any]] = {waiter, post, deadline}
        try:
            while True:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    return waiter.result()
                if post in done:
                    waiting.discard(post)
                    reply = post.result()
                    if isinstance(reply, list):
                        return reply
                    if isinstance(reply, _Failed):
                        return None
                    # WAIT: the actions come through respond (or not at all)
                if deadline in done:
                    deadline.result()  # raises CallEnded if the call ended
                    log.info(
                        "call %s: cycle %d: no actions within %g s",
                        self._call_fields.get("callId"),
                        self.cycle,
                        self._timeout_s,
                    )
                    return None
        finally:
            self._waiter = None
            for fut in (waiter, post, deadline):
                fut.cancel()
            await asyncio.wait({post, deadline})
            for fut in (post, deadline):
                if not fut.cancelled() and (exc := fut.exception()) is not None:
                    log.debug("cycle %d: %r after the cycle was answered", self.cycle, exc)

    def _state(self, reason: Reason, extra: Mapping[str, str] | None) -> dict[str, Any]:
        """The next cycle's state: the call's fields win over verb results of the same name."""
        self.cycle += 1
        return {**(extra or {}), **self._call_fields, "cycle": self.cycle, "reason": reason}

    def _spawn(self, aw: Any) -> None:
        task = asyncio.ensure_future(aw)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post(self, state: Mapping[str, Any]) -> list[dict[str, Any]] | _Wait | _Failed:
        """POST the state; the reply's actions, WAIT, or FAILED (logged)."""
        call_id = self._call_fields.get("callId")
        data = json.dumps(state, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: sign(self._secret, data),
        }
        started = time.monotonic()
        try:
            async with self._session.post(
                self._url,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                allow_redirects=False,
            ) as resp:
                raw = await resp.content.read(MAX_REPLY_BYTES + 1)
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            log.warning("call %s: controller unreachable: %s", call_id, type(err).__name__)
            return FAILED
        log.debug(
            "call %s: cycle %s -> %d, %d bytes in %.0f ms",
            call_id,
            state.get("cycle"),
            status,
            len(raw),
            (time.monotonic() - started) * 1000,
        )
        if not 200 <= status < 300:
            log.warning("call %s: controller answered HTTP %d", call_id, status)
            return FAILED
        if status == 204 or not raw.strip():
            return WAIT
        return _actions(raw, call_id)

    async def _hold(self, stop: asyncio.Event) -> None:
        """Loop the hold audio until `stop` (after a short grace: fast replies get none)."""
        try:
            await asyncio.wait_for(stop.wait(), self._hold_grace_s)
            return
        except TimeoutError:
            pass
        assert self._hold_url is not None
        try:
            wav = await self._prompts.audio(self._hold_url)
        except MediaError as err:
            log.warning(
                "call %s: hold audio skipped: %s: %s",
                self._call_fields.get("callId"),
                err.code,
                err.message,
            )
            return
        while not stop.is_set():
            started = time.monotonic()
            await self._leg.play(wav, stop=stop)
            if time.monotonic() - started < 0.05:  # an (almost) empty file: don't spin
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except TimeoutError:
                    pass


def _actions(raw: bytes, call_id: str | None) -> list[dict[str, Any]] | _Wait | _Failed:
    """A controller's reply body: its actions (validated), WAIT for none, FAILED if unusable."""
    if len(raw) > MAX_REPLY_BYTES:
        log.warning("call %s: controller reply over %d bytes", call_id, MAX_REPLY_BYTES)
        return FAILED
    try:
        check_depth(raw)
        body: Any = json.loads(raw)
    except (DocumentError, ValueError):
        log.warning("call %s: controller reply is not a JSON document", call_id)
        return FAILED
    if not isinstance(body, dict) or not isinstance(body.get("actions"), list):
        log.warning('call %s: controller reply has no "actions" list', call_id)
        return FAILED
    actions: list[dict[str, Any]] = body["actions"]
    if not actions:
        return WAIT
    try:
        parse_document(body)
    except DocumentError as err:
        log.warning(
            "call %s: invalid actions from the controller: %s",
            call_id,
            "; ".join(map(str, err.errors)),
        )
        return FAILED
    return actions


async def _stop(task: asyncio.Task[None]) -> None:
    """Let the hold loop see its stop (its player stops), cancel it if it lingers."""
    done, _ = await asyncio.wait({task}, timeout=2.0)
    if not done:
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("hold audio ended with %r", exc)
