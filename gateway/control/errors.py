"""Why a worker refused an op (the `Reply.code`); the supervisor maps codes to API errors."""

from __future__ import annotations

NOT_FOUND = "call_not_found"
NOT_ANSWERED = "call_not_answered"
NOT_CONTROLLED = "call_not_controlled"
NO_SLOT = "no_slot"
CALL_ENDED = "call_ended"
CALL_EXISTS = "call_exists"
FAILED = "failed"


class OpRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
