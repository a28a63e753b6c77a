"""Place an outbound call on a worker: the supervisor has chosen the worker (a free slot) and the
trunks (in failover order); the worker sends the INVITE and replies once it is on the wire."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from config.settings import ControlPlaneSettings


class Destination(BaseModel):
    """Where a call's events go (the outbox row's url/secret/policy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    secret: str = Field(repr=False)
    policy: Literal["control_plane", "customer"]


def events_destination(
    cp: ControlPlaneSettings, number_events_url: str | None, secret: str,
    explicit_url: str | None = None,
) -> Destination | None:
    """Where a call's events go: a URL given for this call, else the control plane when
    configured, else the number's events_url; None when there is nowhere (only logged)."""
    if explicit_url:
        return Destination(url=explicit_url, secret=secret, policy="customer")
    if cp.events_url and cp.secret is not None:
        return Destination(url=cp.events_url, secret=cp.secret.get_secret_value(),
                           policy="control_plane")
    if number_events_url:
        return Destination(url=number_events_url, secret=secret, policy="customer")
    return None


class TrunkTarget(BaseModel):
    """One try: the Request-URI for this trunk and the trunk's name (its pjsua2 account)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trunk: str
    uri: str  # sip:+254722000001@carrier.example:5060;transport=tcp


class Mcp(BaseModel):
    """`control: "mcp"` on create: the call asks its controller for actions each cycle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    control_url: str
    control_secret: str = Field(repr=False)
    control_timeout_ms: int = 10000
    hold_audio_url: str | None = None
    opening_actions: list[dict[str, Any]] | None = None
    fallback_actions: list[dict[str, Any]] | None = None


class Originate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["originate"] = "originate"
    identity: dict[str, Any]  # CallIdentity.to_wire()
    targets: list[TrunkTarget]  # tried in order on 503 / 408 without a provisional answer
    caller_id: str  # the From user part (E.164)
    timeout_s: float = 30.0  # ring time before the gateway CANCELs (no_answer)
    time_limit_s: float | None = None  # whole call, from answer
    voice_callback_url: str | None = None
    voice_callback_method: Literal["POST", "GET"] = "POST"
    callback_body: Literal["form", "json"] = "form"
    webhook_secret: str = Field(default="", repr=False)
    actions: list[dict[str, Any]] | None = None  # inline document instead of a URL
    events: Destination | None = None
    mcp: Mcp | None = None
