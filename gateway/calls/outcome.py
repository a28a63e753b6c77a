"""How a call ended, as one pure function: (the SIP facts, who ended it, the gateway's reason if
it had one) -> (status, hangup_cause, sip_code, reason, message). Inbound calls, outbound calls,
child legs and lost workers all go through `classify`; tests/unit/test_outcome.py is its table.

Rules, in order:
1. Answered and nobody failed: `completed` / normal_clearing, whoever hung up.
2. Answered, then the gateway failed it (voice app error, worker lost...): `failed`.
3. Not answered and hung up through the API: `canceled` (CANCEL outbound, a final response
   inbound). Inbound, a CANCEL from the caller answered 487: `canceled`, even if the gateway was
   failing the call at that moment (a CANCEL racing the voice app's fetch).
4. Not answered, the gateway's own ring timeout CANCELed it: `no_answer`.
5. Not answered, the gateway failed it (document error, no media): `failed` with its reason.
6. Not answered, the far end refused (outbound callee, or a carrier's final for inbound):
   486/600 busy, 480/408 no_answer, 404/484/604 failed unallocated_number, any other code
   failed with that code (603 included: outbound statuses are busy/no_answer/failed/canceled).
7. Not answered, the voice app refused an inbound call (`reject`): 486/600 busy, 603 rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Q.850 cause names, as the seeds' `hangup_cause` spells them.
NORMAL_CLEARING = "normal_clearing"
USER_BUSY = "user_busy"
NO_ANSWER = "no_answer"
NO_USER_RESPONSE = "no_user_response"
UNALLOCATED = "unallocated_number"
CALL_REJECTED = "call_rejected"
ORIGINATOR_CANCEL = "originator_cancel"
TEMPORARY_FAILURE = "normal_temporary_failure"

CAUSE_BY_CODE = {
    404: UNALLOCATED,
    408: "recovery_on_timer_expire",
    480: NO_USER_RESPONSE,
    484: "invalid_number_format",
    486: USER_BUSY,
    487: ORIGINATOR_CANCEL,
    500: TEMPORARY_FAILURE,
    502: "network_out_of_order",
    503: TEMPORARY_FAILURE,
    600: USER_BUSY,
    603: CALL_REJECTED,
    604: UNALLOCATED,
}
# Q.850 cause values a carrier may send in `Reason: Q.850;cause=N` (RFC 3326), when given.
CAUSE_BY_Q850 = {
    1: UNALLOCATED,
    16: NORMAL_CLEARING,
    17: USER_BUSY,
    18: NO_USER_RESPONSE,
    19: NO_ANSWER,
    21: CALL_REJECTED,
    28: "invalid_number_format",
    31: "normal_unspecified",
    34: "no_circuit_available",
    38: "network_out_of_order",
    41: TEMPORARY_FAILURE,
    102: "recovery_on_timer_expire",
}

Status = Literal["completed", "failed", "busy", "no_answer", "canceled", "rejected"]
EndedBy = Literal["remote", "local", "api"]


@dataclass(frozen=True)
class Failure:
    """Why the gateway ended (or is ending) a call: a stable reason code and a message."""

    reason: str
    message: str


@dataclass(frozen=True)
class CallFacts:
    """What is known when a call ends."""

    direction: Literal["inbound", "outbound"]
    answered: bool
    sip_code: int  # the final response (unanswered) or the last code PJSIP saw
    by: EndedBy = "remote"  # who ended it: the far end, the gateway (app/verb), an API command
    sip_reason: str = ""
    failure: Failure | None = None
    ring_timeout: bool = False  # the gateway CANCELed an outbound leg that rang too long
    q850: int | None = None


@dataclass(frozen=True)
class Outcome:
    status: Status
    hangup_cause: str
    sip_code: int
    reason: str | None  # None only for completed
    message: str | None

    @property
    def final_kind(self) -> str:
        return "call.completed" if self.status == "completed" else "call.failed"

    @property
    def callback_status(self) -> str:
        """The voice callback's `callStatus` for this outcome (Twilio's spelling)."""
        return self.status.replace("_", "-")


# The reason phrase of the front's 404 for `client:<name>` with no registration
# (config/kamailio/kamailio.cfg.tmpl, route TO_BROWSER).
CLIENT_NOT_REGISTERED = "Client Not Registered"


def classify(f: CallFacts) -> Outcome:
    what = f"{f.sip_code} {f.sip_reason}".rstrip()
    if f.answered:
        if f.failure is None:
            return Outcome("completed", NORMAL_CLEARING, 200, None, None)
        return Outcome("failed", TEMPORARY_FAILURE, 200, f.failure.reason, f.failure.message)
    if f.by == "api" and not f.ring_timeout:
        # An API hangup before answer: CANCEL (outbound) or a final response (inbound).
        return Outcome("canceled", ORIGINATOR_CANCEL, f.sip_code, "api_hangup",
                       "hung up through the API before the call was answered")
    if f.sip_code == 487 and not f.ring_timeout and f.direction == "inbound":
        return Outcome("canceled", ORIGINATOR_CANCEL, 487, "caller_canceled",
                       "the caller hung up before the call was answered")
    if f.ring_timeout:
        return Outcome("no_answer", NO_ANSWER, 487, "ring_timeout",
                       "the callee did not answer within the ring timeout")
    if f.failure is not None:
        return Outcome("failed", TEMPORARY_FAILURE, f.sip_code, f.failure.reason,
                       f.failure.message)
    cause = CAUSE_BY_CODE.get(f.sip_code, TEMPORARY_FAILURE)
    if f.q850 is not None and f.q850 in CAUSE_BY_Q850:
        cause = CAUSE_BY_Q850[f.q850]
    if f.by == "local" and f.direction == "inbound":
        # the voice app's own `reject` (the gateway sent the final response)
        if f.sip_code in (486, 600):
            return Outcome("busy", USER_BUSY, f.sip_code, "rejected_busy",
                           "the voice app rejected the call as busy")
        if f.sip_code == 603:
            return Outcome("rejected", CALL_REJECTED, 603, "rejected",
                           "the voice app rejected the call")
        return Outcome("failed", cause, f.sip_code, "sip_error", what)
    if f.direction == "inbound":
        return Outcome("failed", cause, f.sip_code, "sip_error",
                       f"call ended before answer: {what}")
    # An outbound leg the callee (or the trunk) refused.
    if f.sip_code in (486, 600):
        return Outcome("busy", cause, f.sip_code, "callee_busy", f"the callee was busy: {what}")
    if f.sip_code in (480, 408):
        return Outcome("no_answer", cause, f.sip_code, "no_answer",
                       f"the callee did not answer: {what}")
    if f.sip_code == 404 and f.sip_reason == CLIENT_NOT_REGISTERED:
        return Outcome("failed", cause, 404, "client_not_registered",
                       "no browser is registered as that client")
    if f.sip_code in (404, 484, 604):
        return Outcome("failed", cause, f.sip_code, "unallocated_number",
                       f"the number does not exist: {what}")
    return Outcome("failed", cause, f.sip_code, "sip_error", f"the call failed: {what}")
