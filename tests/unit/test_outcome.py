"""The outcome classifier's table: every way a call ends -> status, cause, sip_code, reason."""

from __future__ import annotations

import pytest

from gateway.calls.outcome import CallFacts, Failure, classify

F = Failure("callback_timeout", "m")
LOST = Failure("worker_lost", "m")

# (direction, answered, sip_code, by, failure, ring_timeout) -> (status, cause, sip_code, reason)
TABLE = [
    # answered calls complete, whoever hangs up; a gateway failure after answer is failed
    ("inbound", True, 200, "remote", None, False, "completed", "normal_clearing", 200, None),
    ("inbound", True, 200, "local", None, False, "completed", "normal_clearing", 200, None),
    ("outbound", True, 200, "api", None, False, "completed", "normal_clearing", 200, None),
    ("inbound", True, 200, "local", LOST, False, "failed", "normal_temporary_failure", 200,
     "worker_lost"),
    # inbound before answer: the caller's CANCEL wins over a failure racing it
    ("inbound", False, 487, "remote", None, False, "canceled", "originator_cancel", 487,
     "caller_canceled"),
    ("inbound", False, 487, "local", F, False, "canceled", "originator_cancel", 487,
     "caller_canceled"),
    ("inbound", False, 500, "local", F, False, "failed", "normal_temporary_failure", 500,
     "callback_timeout"),
    # the voice app's reject: busy / rejected
    ("inbound", False, 486, "local", None, False, "busy", "user_busy", 486, "rejected_busy"),
    ("inbound", False, 603, "local", None, False, "rejected", "call_rejected", 603, "rejected"),
    ("inbound", False, 480, "api", None, False, "canceled", "originator_cancel", 480,
     "api_hangup"),
    ("inbound", False, 408, "remote", None, False, "failed", "recovery_on_timer_expire", 408,
     "sip_error"),
    # outbound: what the callee (or trunk) answered
    ("outbound", False, 486, "remote", None, False, "busy", "user_busy", 486, "callee_busy"),
    ("outbound", False, 600, "remote", None, False, "busy", "user_busy", 600, "callee_busy"),
    ("outbound", False, 480, "remote", None, False, "no_answer", "no_user_response", 480,
     "no_answer"),
    ("outbound", False, 408, "remote", None, False, "no_answer", "recovery_on_timer_expire", 408,
     "no_answer"),
    ("outbound", False, 487, "local", None, True, "no_answer", "no_answer", 487, "ring_timeout"),
    ("outbound", False, 404, "remote", None, False, "failed", "unallocated_number", 404,
     "unallocated_number"),
    ("outbound", False, 484, "remote", None, False, "failed", "invalid_number_format", 484,
     "unallocated_number"),
    ("outbound", False, 604, "remote", None, False, "failed", "unallocated_number", 604,
     "unallocated_number"),
    ("outbound", False, 603, "remote", None, False, "failed", "call_rejected", 603, "sip_error"),
    ("outbound", False, 503, "remote", None, False, "failed", "normal_temporary_failure", 503,
     "sip_error"),
    ("outbound", False, 487, "api", None, False, "canceled", "originator_cancel", 487,
     "api_hangup"),
    ("outbound", False, 503, "local", LOST, False, "failed", "normal_temporary_failure", 503,
     "worker_lost"),
]


@pytest.mark.parametrize(
    ("direction", "answered", "code", "by", "failure", "timeout", "status", "cause", "sip",
     "reason"),
    TABLE,
)
def test_table(direction, answered, code, by, failure, timeout, status, cause, sip, reason):
    got = classify(CallFacts(direction=direction, answered=answered, sip_code=code, by=by,
                             failure=failure, ring_timeout=timeout, sip_reason="x"))
    assert (got.status, got.hangup_cause, got.sip_code, got.reason) == (status, cause, sip, reason)
    assert got.final_kind == ("call.completed" if status == "completed" else "call.failed")
    assert (got.message is None) == (status == "completed")


def test_callback_status_uses_the_voice_callback_spelling() -> None:
    got = classify(CallFacts(direction="outbound", answered=False, sip_code=480))
    assert got.callback_status == "no-answer"


def test_q850_reason_refines_the_cause() -> None:
    got = classify(CallFacts(direction="outbound", answered=False, sip_code=480, q850=17))
    assert got.hangup_cause == "user_busy"
