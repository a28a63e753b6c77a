"""The events a call is owed when its worker dies under it (the supervisor writes them).

The worker reports a call to the supervisor (`CallState`, with where its events go) before its
own `call.started` is committed: the outbox's writer thread may still hold it, and a call the
app answers at once can be answered by then too. A worker killed in that window leaves the
outbox with nothing, or only part, of the call; the supervisor fills in what is missing
(`call.started`, `call.answered` when the directory saw the answer) before the final, so the
control plane never sees a final without its start, nor loses a call it was told nothing of.
"""

from __future__ import annotations

import logging
from datetime import datetime

from gateway.calls.directory import Entry
from gateway.calls.outcome import CallFacts, Failure, classify
from gateway.calls.writer import answered_data, final_data, started_data
from gateway.control.originate import Destination
from gateway.events.envelope import Event, make_event
from gateway.events.outbox import Outbox

log = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"


def _answered_at(body: bytes) -> float | None:
    try:
        value = Event.from_body(body).data.get("answered_at")
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError):
        return None


def write_lost_call(
    outbox: Outbox, *, entry: Entry, index: int, now: float
) -> tuple[float | None, bool | None]:
    """Write the lost call's missing events and its final (on the outbox's writer thread, so
    nothing else of this call is written meanwhile). Its answered_at (None: never answered),
    and whether the final was stored: None with no events destination, False when the call
    already had its final (the worker wrote it just before dying)."""
    ident = entry.identity
    rows = outbox.rows_for_call(ident.call_id)
    # Answered per the outbox, not only the directory: the worker may have written
    # call.answered and died before its CallState reached us.
    answered_at = entry.answered_at
    kinds = {row.kind for row in rows}
    if answered_at is None:
        for row in rows:
            if row.kind == "call.answered":
                answered_at = _answered_at(row.body)
                break
    dest = entry.events
    if dest is None and rows:  # from a worker that did not say: where its first event went
        first = rows[0]
        dest = Destination(url=first.url, secret=first.secret, policy=first.policy)
    if dest is None:
        log.error("call %s lost with worker %d (no events destination)", ident.call_id, index)
        return answered_at, None
    workspace = rows[0].workspace_id if rows else ident.workspace_id

    def append(event: Event, *, final: bool = False) -> bool:
        return outbox.append(event, url=dest.url, secret=dest.secret, policy=dest.policy,
                             call_id=ident.call_id, final=final)

    if any(row.final for row in rows):
        return answered_at, False
    if "call.started" not in kinds:
        log.warning("call %s: its call.started was not stored before worker %d died; "
                    "written now", ident.call_id, index)
        append(make_event("call.started", workspace, started_data(ident)))
    if answered_at is not None and "call.answered" not in kinds:
        append(make_event("call.answered", workspace, answered_data(ident, answered_at)))
    outcome = classify(
        CallFacts(
            direction=ident.direction,
            answered=answered_at is not None,
            sip_code=200 if answered_at is not None else 503,
            by="local",
            failure=Failure(
                WORKER_LOST, f"the worker process holding the call exited (worker {index})"
            ),
        )
    )
    data = final_data(ident.event_base(), outcome, answered_at, now)
    return answered_at, append(make_event(outcome.final_kind, workspace, data), final=True)
