"""A `CallControl` over a fixed list of live calls, for API tests that only read calls (admin,
limits, envelope): creating a call is refused 503, a command finds no call."""

from __future__ import annotations

from typing import Any

from gateway.calls.control import CALLS_NOT_FOUND, CAPACITY, ControlError, OutboundCall
from gateway.control.hangup import Hangup
from gateway.control.redirect import Redirect
from gateway.control.respond import Respond


class StaticCalls:
    def __init__(self, calls: list[dict[str, Any]] | None = None) -> None:
        self.calls = calls if calls is not None else []

    async def originate(self, call: OutboundCall) -> dict[str, Any]:
        raise ControlError(503, CAPACITY, "this test node places no calls", 1)

    async def command(self, op: Hangup | Redirect | Respond) -> dict[str, Any]:
        raise ControlError(404, CALLS_NOT_FOUND, f"no live call {op.call_id}")

    def live_call(self, call_id: str) -> dict[str, Any] | None:
        return next((c for c in self.live_calls() if c.get("call_id") == call_id), None)

    def live_calls(self) -> list[dict[str, Any]]:
        return self.calls
