"""What `POST /v1/calls/{id}/supervision` and `PATCH` accept, as the SDK writes it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from dsl.phone import InvalidNumber, parse_e164

Mode = Literal["listen", "whisper", "barge"]
Announce = Literal["none", "agent", "both"]
MODES: tuple[Mode, ...] = ("listen", "whisper", "barge")


def _e164(value: str) -> str:
    try:
        return parse_e164(value)
    except InvalidNumber as e:
        raise PydanticCustomError(
            "supervisor_number", "expected a phone number like +254711000000 ({reason})",
            {"reason": e.reason},
        ) from None


def _sip_identity(value: str) -> str:
    """A SIP URI (`sip:alice@pbx.example.com`), or `user@host` taken as one."""
    v = value.strip()
    if not v.lower().startswith(("sip:", "sips:")):
        v = f"sip:{v}"
    rest = v.split(":", 1)[1]
    if "@" not in rest or not rest.split("@", 1)[1] or any(c in v for c in " <>\"\r\n"):
        raise PydanticCustomError(
            "supervisor_sip", "expected a SIP URI like sip:alice@pbx.example.com"
        )
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhoneSupervisor(_Strict):
    type: Literal["phone"]
    number: Annotated[str, StringConstraints(max_length=32), AfterValidator(_e164)]


class SipSupervisor(_Strict):
    type: Literal["sip"]
    identity: Annotated[str, StringConstraints(min_length=3, max_length=256),
                        AfterValidator(_sip_identity)]


class ClientSupervisor(_Strict):
    """A browser client (`client:<name>`): accepted by the SDK; refused with 422 here until
    browser calling lands (gateway/api/supervision.py says so)."""

    type: Literal["client"]
    identity: Annotated[str, StringConstraints(min_length=1, max_length=128)]


Supervisor = Annotated[
    PhoneSupervisor | SipSupervisor | ClientSupervisor, Field(discriminator="type")
]


class StartSupervision(_Strict):
    mode: Mode
    supervisor: Supervisor
    announce: Announce = "none"
    label: Annotated[str, StringConstraints(max_length=64)] | None = None
    notify_agent: bool = False


class ChangeMode(_Strict):
    mode: Mode
