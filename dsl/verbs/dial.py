"""`dial`: connect the caller to a number, several numbers, or a SIP URI.

The gateway does the calling (`ctx.dialer`); the verb hands it a plain request and keeps what
comes back (DialCallStatus, DialCallSid, DialCallDuration, DialSipStatus) in the call's
persisted fields, so every later voice app request carries them. A dial that ends its document
makes the interpreter ask the voice callback URL what to do next (Twilio's model).
"""

from __future__ import annotations

import logging
from typing import Annotated, ClassVar

from pydantic import AfterValidator, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dsl.context import CallContext, DialRequest, DialResult, DialTarget
from dsl.errors import VerbUnsupported
from dsl.phone import InvalidNumber, parse_e164
from dsl.verbs.base import NEXT, Needs, RunState, Step, Verb, extension

E164_PATTERN = r"^\+[1-9][0-9]{1,14}$"
log = logging.getLogger(__name__)

# A browser client's name (`client:<name>`, what its WebRTC token's `sub` holds).
CLIENT_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
# `sip` takes a SIP URI or `client:<name>` (a registered browser; every registration rings).
SIP_URI_PATTERN = rf"^(sips?:[^\s]+|client:{CLIENT_NAME_PATTERN})$"
RECORD_MODES = ("record-from-answer", "record-from-ringing")


def _to_e164(value: str) -> str:
    """National forms ("0712345678") normalise as inbound routing does (in the node's
    `[routing] default_region`); E.164 passes through. A refusal says why."""
    try:
        return parse_e164(value)
    except InvalidNumber as e:
        raise PydanticCustomError(
            "dial_number",
            "expected a phone number like +254711000000 or 0711000000 ({reason})",
            {"reason": e.reason},
        ) from None


E164 = Annotated[str, StringConstraints(max_length=32), AfterValidator(_to_e164)]


class Dial(Verb):
    """Call out and bridge the caller to whoever answers.

    Exactly one of `number`, `numbers` (all ring at once unless `sequential`) or `sip`.
    The caller hears ringback (or the callee's early media) until someone answers; the
    document goes on once either side hangs up.
    """

    verb: ClassVar[str] = "dial"
    needs: ClassVar[Needs] = "media"

    number: E164 | None = Field(None, description="E.164 number to call, e.g. +254711000000.")
    numbers: list[E164] | None = Field(
        None,
        min_length=1,
        max_length=10,
        description="E.164 numbers to ring (fan-out); the first to answer is bridged.",
    )
    sip: str | None = Field(None, pattern=SIP_URI_PATTERN,
                             description="SIP URI to call, or client:<name> (a browser).")
    caller_id: str | None = Field(
        None, max_length=64, description="Caller ID presented to the called party."
    )
    timeout: float = Field(30, gt=0, le=600, description="Seconds to ring before giving up.")
    record: str | None = Field(
        None,
        max_length=64,
        description='Record the bridged call: "record-from-answer" or "record-from-ringing"; '
        "any other value is ignored (logged).",
    )
    sequential: bool = extension(
        False, description="Ring `numbers` one after another instead of all at once."
    )
    time_limit: float | None = extension(
        None, gt=0, le=86400, description="Longest bridged call in seconds."
    )

    @field_validator("record")
    @classmethod
    def _record_mode(cls, value: str | None) -> str | None:
        # The SDK types `record` as any string: accept, but say what is understood.
        if value is not None and value not in RECORD_MODES:
            log.info("dial.record %r ignored; valid values: %s", value, " or ".join(RECORD_MODES))
            return None
        return value

    @model_validator(mode="after")
    def _one_target(self) -> Dial:
        # The SDK's own runtime rule names, so errors read the same on both sides.
        if self.number is not None and self.numbers is not None:
            raise PydanticCustomError("ErrDialNumberNumbers", "give number or numbers, not both")
        targets = [t for t in (self.number, self.numbers, self.sip) if t is not None]
        if len(targets) != 1:
            raise PydanticCustomError(
                "ErrDialTargetXOR", "exactly one of number, numbers or sip is required"
            )
        return self

    def request(self) -> DialRequest:
        targets: tuple[DialTarget, ...]
        if self.sip is not None and self.sip.startswith("client:"):
            targets = (DialTarget("client", self.sip.removeprefix("client:")),)
        elif self.sip is not None:
            targets = (DialTarget("sip", self.sip),)
        else:
            numbers = self.numbers if self.numbers is not None else [self.number or ""]
            targets = tuple(DialTarget("number", n) for n in numbers)
        return DialRequest(
            targets=targets,
            sequential=self.sequential,
            caller_id=self.caller_id,
            timeout_s=self.timeout,
            record=self.record,
            time_limit_s=self.time_limit,
        )

    async def run(self, ctx: CallContext, state: RunState) -> Step:
        if ctx.dialer is None:
            raise VerbUnsupported(self.verb)
        result = await ctx.dialer.dial(self.request())  # CallEnded: the caller hung up
        ctx.params.update(dial_fields(result))
        log.info("call %s: %s: DialCallStatus %s (%s)", state.call_id, state.path,
                 result.status, result.call_sid or "no leg")
        return NEXT


def dial_fields(result: DialResult) -> dict[str, str]:
    """The fields every later voice app request carries (Twilio's names)."""
    fields = {
        "DialCallStatus": result.status,
        "DialCallSid": result.call_sid,
        "DialCallDuration": str(result.duration_s),
    }
    if result.sip_status is not None:
        fields["DialSipStatus"] = str(result.sip_status)
    return fields
