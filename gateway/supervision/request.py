"""What `POST /v1/calls/{id}/supervision` and `PATCH` accept, as the SDK writes it."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from dsl.phone import InvalidNumber, parse_e164
from dsl.verbs.dial import CLIENT_NAME_PATTERN

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


def _client_name(v: str) -> str:
    name = v.removeprefix("client:")
    if not re.fullmatch(CLIENT_NAME_PATTERN, name):
        raise ValueError("expected a browser client's name (client:<name> or <name>: 1-64 of "
                         "A-Z a-z 0-9 _ . -)")
    return name


class ClientSupervisor(_Strict):
    """A browser client (`client:<name>`, every registration of it rings); needs
    `[webrtc] enabled` (gateway/api/supervision.py answers 422 otherwise)."""

    type: Literal["client"]
    identity: Annotated[str, StringConstraints(min_length=1, max_length=128),
                        AfterValidator(_client_name)]


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
