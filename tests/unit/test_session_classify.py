"""The final-event classifier: the status follows what SIP said."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.session import CallSession, Failure
from media.call import CallEnd


def classify(
    code: int, by: str, answered: bool, failure: Failure | None = None
) -> tuple[str, str, str, str]:
    session: Any = CallSession.__new__(CallSession)
    session.failure = failure
    return CallSession._classify(session, CallEnd(code, "x", by, answered, 0.0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "by", "answered", "failure", "status", "reason"),
    [
        (487, "remote", False, None, "canceled", "caller_canceled"),
        # CANCEL racing the gateway's own teardown: SIP said 487, so canceled.
        (487, "local", False, None, "canceled", "caller_canceled"),
        (487, "remote", False, Failure("callback_timeout", "m"), "canceled", "caller_canceled"),
        (480, "remote", False, None, "failed", "sip_error"),
        (486, "local", False, None, "busy", "rejected_busy"),
        (603, "local", False, None, "rejected", "rejected"),
        (500, "local", False, Failure("document_empty", "m"), "failed", "document_empty"),
        (200, "local", True, Failure("verb_unsupported", "m"), "failed", "verb_unsupported"),
    ],
)
def test_classification(
    code: int, by: str, answered: bool, failure: Failure | None, status: str, reason: str
) -> None:
    got = classify(code, by, answered, failure)
    assert (got[0], got[2]) == (status, reason)
