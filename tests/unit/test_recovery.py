"""Closing a dead node's open calls: one final per call, ended_at from the right run."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.events.envelope import make_event
from gateway.events.outbox import Outbox
from gateway.events.recovery import Heartbeat, close_open_calls, read_heartbeat, write_heartbeat

URL = "http://127.0.0.1:9/events"
BASE = {"direction": "inbound", "from": "+254722000001", "to": "+254700000001",
        "number_id": "num_1"}


def _open_call(outbox: Outbox, call_id: str, answered: bool) -> None:
    outbox.append(make_event("call.started", "ws_1", {"call_id": call_id, **BASE}),
                  url=URL, secret="s", policy="customer", call_id=call_id)
    if answered:
        outbox.append(make_event("call.answered", "ws_1", {
            "call_id": call_id, **BASE, "answered_at": "2026-12-01T10:00:00.000Z"}),
            url=URL, secret="s", policy="customer", call_id=call_id)


def _finals(outbox: Outbox, call_id: str) -> list[dict]:
    return [json.loads(r.body) for r in outbox.rows_for_call(call_id) if r.final]


def test_each_open_call_closed_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3") as outbox:
        _open_call(outbox, "a", answered=True)
        _open_call(outbox, "b", answered=False)
        _open_call(outbox, "done", answered=True)
        outbox.append(make_event("call.completed", "ws_1", {"call_id": "done"}), url=URL,
                      secret="s", policy="customer", call_id="done", final=True)
        created = max(r.created_at for r in outbox.rows_for_call("b"))
        hb = Heartbeat(1, created - 10, created + 1.5)
        assert close_open_calls(outbox, hb, created + 30) == ["a", "b"]
        assert close_open_calls(outbox, hb, created + 60) == []  # a second start: nothing
        (fa,), (fb,) = _finals(outbox, "a"), _finals(outbox, "b")
        assert fa["kind"] == "call.failed" and fa["data"]["reason"] == "node_lost"
        assert fa["data"]["answered_at"] == "2026-12-01T10:00:00.000Z"
        assert fb["data"]["answered_at"] is None and fb["data"]["from"] == "+254722000001"
        assert len(_finals(outbox, "done")) == 1


def test_call_older_than_the_heartbeat_run_ends_at_its_last_event(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3") as outbox:
        _open_call(outbox, "old", answered=True)
        last = max(r.created_at for r in outbox.rows_for_call("old"))
        later_run = Heartbeat(1, last + 3600, last + 7200)
        close_open_calls(outbox, later_run, last + 9000)
        (f,) = _finals(outbox, "old")
        from datetime import datetime
        ended = datetime.fromisoformat(f["data"]["ended_at"].replace("Z", "+00:00"))
        assert abs(ended.timestamp() - last) < 0.01


def test_heartbeat_round_trip_and_garbage(tmp_path: Path) -> None:
    p = tmp_path / "hb.json"
    assert read_heartbeat(p) is None
    write_heartbeat(p, Heartbeat(7, 1.5, 2.5))
    assert read_heartbeat(p) == Heartbeat(7, 1.5, 2.5)
    p.write_text("{not json")
    assert read_heartbeat(p) is None


def test_prune_keeps_a_final_while_its_call_has_other_rows(tmp_path: Path) -> None:
    """A dead-lettered recording.ready must not leave a completed call looking open."""
    import time

    with Outbox(tmp_path / "o.sqlite3") as outbox:
        _open_call(outbox, "c", answered=True)
        outbox.append(make_event("call.completed", "ws_1", {"call_id": "c"}), url=URL,
                      secret="s", policy="customer", call_id="c", final=True)
        outbox.append(make_event("call.recording.ready", "ws_1", {"call_id": "c"}), url=URL,
                      secret="s", policy="customer", call_id="c")
        rows = outbox.rows_for_call("c")
        for r in rows[:-1]:
            outbox.mark_delivered(r.id)
        outbox.mark_failed(rows[-1].id, "HTTP 500", None)  # dead letter, kept for retry
        assert outbox.prune_delivered(time.time() + 1) == 2  # started + answered
        assert [r.kind for r in outbox.rows_for_call("c")] == [
            "call.completed", "call.recording.ready"]
        assert outbox.open_calls() == []
        assert close_open_calls(outbox, None, time.time()) == []
        # Once the dead letter is re-sent and delivered, the whole call goes.
        outbox.retry(rows[-1].id)
        outbox.mark_delivered(rows[-1].id)
        assert outbox.prune_delivered(time.time() + 1) == 2
        assert outbox.rows_for_call("c") == []


def test_rows_without_call_started_are_not_reopened(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3") as outbox:
        outbox.append(make_event("call.recording.ready", "ws_1", {"call_id": "x"}), url=URL,
                      secret="s", policy="customer", call_id="x")
        assert outbox.open_calls() == []
