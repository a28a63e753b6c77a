"""`aiAgent`: hand the call to a voice AI agent (SDK 0.5.0).

"The platform expands it server-side into a `stream` fork": here that expansion is a
`StreamRequest` to the operator's agent runtime (`ctx.streams.agent`, `[ai_agents]`), held
like `stream` with `connect`. What follows the agent is made of the existing verbs: a
`callbackUrl` handover fetches a document like `redirect`, a forward is a `dial`, a voicemail
is a `say` or `play` greeting then a `record`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from dsl.context import (
    CallContext,
    DialTarget,
    MediaError,
    StreamEnd,
    StreamRequest,
    VoiceAppError,
)
from dsl.errors import VerbUnsupported
from dsl.phone import InvalidNumber, parse_e164
from dsl.verbs.base import NEXT, Needs, PromptVerb, RunState, Step, Verb, end, reply_step
from dsl.verbs.dial import CLIENT_NAME_PATTERN, Dial, dial_fields
from dsl.verbs.play import Play
from dsl.verbs.record import Record
from dsl.verbs.say import Say
from dsl.verbs.stream import hold

log = logging.getLogger(__name__)

STREAM_NAME = "ai-agent"
DEFAULT_GREETING = "Please leave a message after the tone."
DEFAULT_GREETING_NO_BEEP = "Please leave a message."
VOICEMAIL_MAX_LENGTH_S = 120.0  # `maxLength` absent or 0
EXTENSION = re.compile(r"^[0-9]{4}$")
CLIENT_NAME = re.compile(CLIENT_NAME_PATTERN)


class _Part(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", strict=True, frozen=True)


class Voicemail(_Part):
    greeting_text: str | None = Field(None, max_length=4000, description="Greeting to say.")
    greeting_play_url: str | None = Field(None, max_length=2048, description="Greeting to play.")
    greeting_voice: Literal["man", "woman"] | None = Field(None, description="Greeting voice.")
    max_length: float | None = Field(
        None,
        ge=0,
        le=14400,
        description=f"Longest message (s); absent or 0: {VOICEMAIL_MAX_LENGTH_S:g}.",
    )
    beep: bool | None = Field(None, description="Beep before recording; default true.")


class Forward(_Part):
    destinations: list[str] = Field(
        min_length=1,
        max_length=10,
        description="E.164 (or national) numbers and `client:NAME` browsers; 4-digit "
        "extensions are accepted but not dialable yet (skipped).",
    )
    sequential: bool | None = Field(None, description="Ring one after another.")
    first_answer_wins: bool | None = Field(
        None, description="Bridge the first to answer (always so here)."
    )
    ring_timeout: float | None = Field(
        None, gt=0, le=600, description="Seconds to ring (each, when sequential); default 30."
    )
    caller_id: str | None = Field(None, max_length=64, description="Caller ID presented.")
    voicemail: Voicemail | None = Field(None, description="Voicemail when nobody answers.")


class Handover(_Part):
    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="URL (POST) of the document to run next; relative resolves against the "
        "document's URL. Exactly one of callbackUrl, forward, voicemail.",
    )
    forward: Forward | None = Field(None, description="Forward the caller.")
    voicemail: Voicemail | None = Field(None, description="Take a voicemail.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Handover:
        if sum(x is not None for x in (self.callback_url, self.forward, self.voicemail)) != 1:
            raise PydanticCustomError(
                "aiAgent.handover", "exactly one of callbackUrl, forward or voicemail is required"
            )
        return self


class AiAgent(Verb):
    """Hand the call to the voice AI agent `agentId`: the caller talks with the agent until
    it hands the call back.

    Must be the last action; a say/play prologue may precede it. The call's audio is streamed
    (as `stream` with `connect`; see [docs/streams.md](streams.md)) to the operator's agent
    runtime (`[ai_agents] url`), whose first text frame's `metadata` carries `agentId`,
    `revision`, `variables`, the call's attributes and the workspace.

    When the runtime sends `{"type": "handover"}` or `disconnect`, closes the socket, the
    socket drops after it was connected, or the stream is stopped (`POST
    /v1/calls/{id}/stream`), `handover` runs: `callbackUrl` is requested (POST,
    with `AgentId`, `AgentHandover=true`, `HandoverReason` and `HandoverData`, the handover
    frame's `data` as JSON) and a non-empty reply is run; `forward` dials `destinations`
    (E.164 or national numbers and `client:NAME` browsers; 4-digit extensions are not
    dialable yet and are skipped), all at once unless `sequential`, and takes its
    `voicemail` when nobody answers; `voicemail` plays the greeting (`greetingText` said in
    `greetingVoice`, `greetingPlayUrl` played, else a default), beeps unless `beep` is
    false, and records up to `maxLength` seconds like `record` (`call.recording.ready`, then
    the voice callback URL). Without `handover` the document ends (the call is hung up).

    When the runtime cannot be used (not configured, unreachable, refusing, or dropped before
    it connected), `onUnavailable` runs: `hangup`; `voicemail` (`voicemail`, else
    `handover.voicemail`, else the default greeting); `forward` (`forward`, else
    `handover.forward`, else hang up); `callback` (POST to `handover.callbackUrl`, else the
    call's voice callback URL, with `AgentId`, `AgentStatus=unavailable` and `AgentError`, and
    run the reply). Where the gateway cannot dial, a forward fails the call (`call.failed`
    names dial), never a silent hangup; a forward with no dialable destination and no
    voicemail fails it with `forward_unavailable`.
    """

    verb: ClassVar[str] = "aiAgent"
    needs: ClassVar[Needs] = "media"
    must_be_last: ClassVar[bool] = True

    agent_id: str = Field(min_length=1, max_length=128, description="The agent to run.")
    revision: str | int | None = Field(None, description="Agent revision; default the latest.")
    variables: dict[str, Any] | None = Field(None, description="Variables for the agent.")
    handover: Handover | None = Field(None, description="Where the call goes after the agent.")
    on_unavailable: Literal["hangup", "voicemail", "forward", "callback"] = Field(
        "hangup", description="What happens when the agent is unavailable."
    )
    voicemail: Voicemail | None = Field(None, description="Voicemail for onUnavailable.")
    forward: Forward | None = Field(None, description="Forward target for onUnavailable.")

    def request(self, ctx: CallContext) -> StreamRequest | None:
        """The stream to the agent runtime; None when there is none."""
        agent = ctx.streams.agent if ctx.streams is not None else None
        if agent is None:
            return None
        return StreamRequest(
            url=agent.url,
            track="inbound_track",
            connect=True,
            output_rate=agent.sample_rate,
            playback_rate=agent.sample_rate,
            name=STREAM_NAME,
            metadata={
                "agentId": self.agent_id,
                "revision": self.revision,
                "variables": self.variables or {},
            },
            purpose="ai_agent",
        )

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        if ctx.streams is None:
            raise VerbUnsupported(self.verb)
        request = self.request(ctx)
        if request is None:
            ended = StreamEnd("unreachable", "no agent runtime ([ai_agents] url is unset)")
            return await self._unavailable(ctx, state, ended)
        try:
            fork = await ctx.streams.open(request)
        except MediaError as err:
            return await self._unavailable(ctx, state, StreamEnd("refused", err.message))
        ended = await hold(ctx, fork)  # CallEnded: the caller hung up
        log.info("call %s: %s: agent %s ended (%s%s)", state.call_id, state.path,
                 self.agent_id, ended.reason, f": {ended.message}" if ended.message else "")
        if ended.unavailable:
            return await self._unavailable(ctx, state, ended)
        return await self._handover(ctx, state, ended)

    async def _handover(self, ctx: CallContext, state: RunState, ended: StreamEnd) -> Step:
        handover = self.handover
        if handover is None:
            return NEXT  # the document ends: the call is hung up
        if handover.callback_url is not None:
            extra = {
                "AgentId": self.agent_id,
                "AgentHandover": "true",
                "HandoverReason": ended.reason,
                "HandoverData": json.dumps(dict(ended.handover or {})),
            }
            url = state.resolve(handover.callback_url)
            return reply_step(await ctx.app.fetch(url, "POST", extra))
        if handover.forward is not None:
            return await _forward(ctx, state, handover.forward)
        assert handover.voicemail is not None  # exactly one target (validated)
        return await _voicemail(ctx, state, handover.voicemail)

    async def _unavailable(self, ctx: CallContext, state: RunState, ended: StreamEnd) -> Step:
        state.note(
            "ai_agent_unavailable",
            f"agent {self.agent_id}: {ended.reason}"
            + (f": {ended.message}" if ended.message else "")
            + f"; onUnavailable {self.on_unavailable}",
        )
        handover = self.handover
        if self.on_unavailable == "voicemail":
            vm = self.voicemail or (handover.voicemail if handover else None)
            vm = vm or Voicemail.model_validate({})
            return await _voicemail(ctx, state, vm)
        if self.on_unavailable == "forward":
            forward = self.forward or (handover.forward if handover else None)
            if forward is not None:
                return await _forward(ctx, state, forward)
            state.note("forward_unavailable", "onUnavailable forward without a forward target")
        elif self.on_unavailable == "callback":
            target = handover.callback_url if handover and handover.callback_url else None
            url = state.resolve(target) if target else ctx.voice_callback_url
            extra = {
                "AgentId": self.agent_id,
                "AgentStatus": "unavailable",
                "AgentError": ended.message or ended.reason,
            }
            return reply_step(await ctx.app.fetch(url, "POST", extra))
        await ctx.leg.hangup()
        return end("hangup_verb")


def dialable(destinations: list[str], state: RunState) -> list[DialTarget]:
    """The destinations as E.164 numbers and browser clients, in order; the others are noted
    and skipped."""
    targets: list[DialTarget] = []
    for dest in destinations:
        if dest[:7].lower() == "client:":
            name = dest[7:]
            if not CLIENT_NAME.fullmatch(name):
                state.note("forward_destination_invalid", f"{dest!r}: not a client name, skipped")
            elif DialTarget("client", name) not in targets:
                targets.append(DialTarget("client", name))
            continue
        if EXTENSION.match(dest):
            state.note("forward_destination_unsupported", f"{dest!r}: not dialable yet, skipped")
            continue
        try:
            number = parse_e164(dest)
        except InvalidNumber as e:
            state.note("forward_destination_invalid", f"{dest!r}: {e.reason}, skipped")
            continue
        if DialTarget("number", number) not in targets:
            targets.append(DialTarget("number", number))
    return targets


async def _forward(ctx: CallContext, state: RunState, forward: Forward) -> Step:
    targets = dialable(forward.destinations, state)
    if not targets:
        if forward.voicemail is not None:
            return await _voicemail(ctx, state, forward.voicemail)
        raise VoiceAppError(
            "forward_unavailable",
            f"{state.path}: no dialable destination in {forward.destinations}",
        )
    if ctx.dialer is None:
        raise VerbUnsupported("dial (aiAgent forward)")
    # Dial validates the options; the targets (numbers and clients mixed) are set after.
    first = targets[0]
    params: dict[str, Any] = {"sequential": bool(forward.sequential)}
    if first.kind == "client":
        params["sip"] = f"client:{first.value}"
    else:
        params["number"] = first.value
    if forward.ring_timeout is not None:
        params["timeout"] = forward.ring_timeout
    if forward.caller_id is not None:
        params["callerId"] = forward.caller_id
    dial = Dial.model_validate(params)
    request = dataclasses.replace(dial.request(), targets=tuple(targets))
    result = await ctx.dialer.dial(request)  # CallEnded: the caller hung up
    ctx.params.update(dial_fields(result))
    log.info("call %s: %s: forward DialCallStatus %s (%s)", state.call_id, state.path,
             result.status, result.call_sid or "no leg")
    if result.status != "completed" and forward.voicemail is not None:
        return await _voicemail(ctx, state, forward.voicemail)
    return NEXT


async def _voicemail(ctx: CallContext, state: RunState, vm: Voicemail) -> Step:
    beep = True if vm.beep is None else vm.beep
    greeting: PromptVerb
    if vm.greeting_text:
        greeting = Say.model_validate({"text": vm.greeting_text, "voice": vm.greeting_voice})
    elif vm.greeting_play_url:
        greeting = Play.model_validate({"url": vm.greeting_play_url})
    else:
        greeting = Say.model_validate(
            {"text": DEFAULT_GREETING if beep else DEFAULT_GREETING_NO_BEEP,
             "voice": vm.greeting_voice}
        )
    try:
        await greeting.perform(ctx, state)
    except MediaError as err:  # no greeting: the message is still taken
        state.skipped(greeting.verb, err.code, err.message)
    record = Record.model_validate(
        {"maxLength": vm.max_length or VOICEMAIL_MAX_LENGTH_S, "playBeep": beep}
    )
    return await record.run(ctx, state)
