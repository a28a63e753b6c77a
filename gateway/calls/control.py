"""What the internal API asks of the node to place and steer calls (the node implements it).

Errors come back as `ControlError`: the API turns them into the product's error envelope.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.control.hangup import Hangup
from gateway.control.redirect import Redirect
from gateway.control.respond import Respond
from gateway.control.stream_stop import StreamStop

# Error codes (the seeds' catalogue where it has one).
NUMBERS_NOT_FOUND = "numbers.not_found"
CALLS_NOT_FOUND = "calls.not_found"
CALLS_ENDED = "calls.ended"  # a command to a call that has ended (409)
CALL_EXISTS = "calls.already_exists"  # a create with the call_id of a known call (409)
CALL_NOT_ANSWERED = "calls.not_answered"
CALL_NOT_CONTROLLED = "calls.not_controlled"
CAPACITY = "calls.capacity"  # no worker slot / trunk capacity within the queue time (503)
NO_TRUNK = "calls.no_trunk"


@dataclass
class ControlError(Exception):
    status: int
    code: str
    message: str
    retry_after_s: int | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


@dataclass(frozen=True)
class OutboundCall:
    """One call of a create request (a `to` list makes one each), decided by the API."""

    call_id: str
    from_: str  # E.164 of a gateway number
    to: str  # E.164
    caller_id: str | None = None
    voice_callback_url: str | None = None
    voice_callback_method: str = "POST"
    events_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    client_request_id: str | None = None
    session_id: str | None = None
    timeout_s: float | None = None
    time_limit_s: float | None = None
    actions: list[dict[str, Any]] | None = None
    control: str | None = None  # "mcp"
    hold_audio_url: str | None = None
    control_timeout_ms: int | None = None
    opening_actions: list[dict[str, Any]] | None = None
    fallback_actions: list[dict[str, Any]] | None = None


class CallControl(Protocol):
    async def originate(self, call: OutboundCall) -> dict[str, Any]:
        """Place the call (INVITE on the wire) and return its summary (CallIdentity.summary).
        Raises ControlError: 422 numbers.not_found, 503 calls.capacity (with retry_after_s)."""

    async def command(self, op: Hangup | Redirect | Respond | StreamStop) -> dict[str, Any]:
        """Run an op on the live call; the worker's result. Raises ControlError 404
        calls.not_found when no live call has that id (the API then looks at records)."""

    def live_call(self, call_id: str) -> dict[str, Any] | None:
        """The summary of a live call on this node, or None."""

    def live_calls(self) -> list[dict[str, Any]]:
        """Summaries of every live call on this node."""
