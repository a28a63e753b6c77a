"""A call whose worker dies gets every event it is owed, once, whatever its worker managed to
store first (gateway/calls/lost.py)."""

import json
import time
from pathlib import Path

from gateway.calls.directory import Entry
from gateway.calls.identity import CallIdentity
from gateway.calls.lost import write_lost_call
from gateway.calls.writer import started_data
from gateway.control.originate import Destination
from gateway.events.envelope import make_event
from gateway.events.outbox import Outbox

DEST = Destination(url="https://cp.example/events", secret="whsec_x", policy="control_plane")


def _entry(answered_at: float | None, events: Destination | None = DEST) -> Entry:
    ident = CallIdentity(call_id="call-1", direction="inbound", from_="+254700000001",
                         to="+254711000002", number_id="num_1", workspace_id="ws_1",
                         created_at=time.time() - 3)
    return Entry(ident, worker=0, status="in-progress" if answered_at else "ringing",
                 answered_at=answered_at, events=events)


def _stored(outbox: Outbox) -> list[tuple[str, dict]]:
    return [(r.kind, json.loads(r.body)["data"]) for r in outbox.rows_for_call("call-1")]


def test_nothing_stored_yet_gets_started_answered_and_failed(tmp_path: Path) -> None:
    answered = time.time() - 1
    with Outbox(tmp_path / "o.sqlite3") as outbox:
        got = write_lost_call(outbox, entry=_entry(answered), index=2, now=time.time())
        assert got == (answered, True)
        rows = outbox.rows_for_call("call-1")
        assert [r.kind for r in rows] == ["call.started", "call.answered", "call.failed"]
        assert {(r.url, r.policy, r.workspace_id) for r in rows} == {
            (DEST.url, "control_plane", "ws_1")
        }
        final = json.loads(rows[-1].body)["data"]
        assert final["reason"] == "worker_lost" and final["status"] == "failed"
        assert final["answered_at"] is not None and "worker 2" in final["message"]
        # a second loss report (or the worker's own final, racing) stores nothing more
        assert write_lost_call(outbox, entry=_entry(answered), index=2, now=time.time())[1] \
            is False
        assert len(outbox.rows_for_call("call-1")) == 3


def test_a_started_call_gets_only_what_it_lacks(tmp_path: Path) -> None:
    entry = _entry(None)
    with Outbox(tmp_path / "o.sqlite3") as outbox:
        outbox.append(make_event("call.started", "ws_1", started_data(entry.identity)),
                      url=DEST.url, secret=DEST.secret, policy=DEST.policy, call_id="call-1")
        assert write_lost_call(outbox, entry=entry, index=0, now=time.time()) == (None, True)
        kinds = [k for k, _ in _stored(outbox)]
        assert kinds == ["call.started", "call.failed"]  # never answered: no call.answered


def test_a_worker_that_named_no_destination_uses_its_first_events(tmp_path: Path) -> None:
    entry = _entry(None, events=None)
    with Outbox(tmp_path / "o.sqlite3") as outbox:
        assert write_lost_call(outbox, entry=entry, index=0, now=time.time()) == (None, None)
        assert outbox.rows_for_call("call-1") == []  # nowhere to send it: only logged
        outbox.append(make_event("call.started", "ws_1", started_data(entry.identity)),
                      url="https://app.example/ev", secret="s", policy="customer",
                      call_id="call-1")
        assert write_lost_call(outbox, entry=entry, index=0, now=time.time())[1] is True
        assert {r.url for r in outbox.rows_for_call("call-1")} == {"https://app.example/ev"}
