import json
import os
import re
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.events.envelope import Event, make_event, rfc3339_ms, uuid7

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_uuid7_version_variant_and_timestamp():
    before = int(datetime.now(UTC).timestamp() * 1000)
    u = uuid.UUID(uuid7())
    after = int(datetime.now(UTC).timestamp() * 1000)
    assert u.version == 7
    assert u.variant == uuid.RFC_4122
    assert (u.int >> 76) & 0xF == 7
    assert (u.int >> 62) & 0b11 == 0b10
    assert before - 1 <= u.int >> 80 <= after + 1  # 48-bit unix ms


def test_uuid7_strictly_increasing_and_unique():
    ids = [uuid7() for _ in range(10_000)]  # a tight loop: many share a millisecond
    assert all(isinstance(i, str) for i in ids)
    assert ids == sorted(ids)  # string sort == creation order
    assert len(set(ids)) == len(ids)
    assert len({i[:13] for i in ids}) < len(ids)  # the test did put several in one millisecond
    assert all(
        re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", i)
        for i in ids
    )


def test_uuid7_threads_each_in_order_all_unique():
    per: dict[int, list[str]] = {}

    def make(n: int) -> None:
        per[n] = [uuid7() for _ in range(2_000)]

    threads = [threading.Thread(target=make, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(ids == sorted(ids) for ids in per.values())
    assert len({i for ids in per.values() for i in ids}) == 8_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_uuid7_forked_child_does_not_repeat_its_parent():
    # Workers may be forked from a preloaded parent: a copied generator state must not make
    # the same ids in two processes.
    uuid7()
    r, w = os.pipe()
    pid = os.fork()
    ids = [uuid7() for _ in range(200)]
    if pid == 0:  # pragma: no cover - the child
        os.write(w, "\n".join(ids).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read().split("\n")
    os.waitpid(pid, 0)
    assert len(child) == 200 and not set(child) & set(ids)


def test_rfc3339_ms_formats():
    dt = datetime(2026, 6, 27, 10, 5, 0, tzinfo=UTC)
    assert rfc3339_ms(dt) == "2026-06-27T10:05:00.000Z"
    # converted to UTC and truncated (never rounded up into the next second)
    eat = timezone(timedelta(hours=3))
    assert rfc3339_ms(datetime(2026, 6, 27, 13, 5, 59, 999_999, tzinfo=eat)) == (
        "2026-06-27T10:05:59.999Z"
    )
    assert RFC3339_MS.match(rfc3339_ms(datetime.now(UTC)))
    with pytest.raises(ValueError):
        rfc3339_ms(datetime(2026, 6, 27, 10, 5))  # naive


def test_make_event_matches_seed_envelope():
    data = {
        "call_id": "c-1",
        "direction": "inbound",
        "from": "+254700000001",
        "status": "completed",
        "duration_seconds": 295,
        "hangup_cause": "normal_clearing",
        "note": "Habari ✓",
    }
    at = datetime(2026, 6, 27, 10, 5, tzinfo=UTC)
    ev = make_event("call.completed", "ws-1", data, occurred_at=at)
    assert isinstance(ev, Event)
    obj = json.loads(ev.body)
    assert list(obj) == ["kind", "event_id", "workspace_id", "occurred_at", "data"]
    assert obj == {
        "kind": "call.completed",
        "event_id": ev.event_id,
        "workspace_id": "ws-1",
        "occurred_at": "2026-06-27T10:05:00.000Z",
        "data": data,
    }
    assert ev.occurred_at == "2026-06-27T10:05:00.000Z"
    assert uuid.UUID(ev.event_id).version == 7
    # compact UTF-8, not ASCII-escaped
    assert b", " not in ev.body and b": " not in ev.body
    assert "Habari ✓".encode() in ev.body
    assert ev.body == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def test_body_is_fixed_once_built():
    data = {"n": 1}
    ev = make_event("call.started", "ws", data)
    body = ev.body
    data["n"] = 2  # the caller's dict is not shared
    ev.data["n"] = 3  # neither is the event's decoded copy with the body
    assert ev.body == body and json.loads(ev.body)["data"] == {"n": 1}
    with pytest.raises(AttributeError):
        ev.body = b"{}"  # type: ignore[misc]
    assert Event.from_body(body).event_id == ev.event_id


def test_make_event_defaults_and_rejects():
    ev = make_event("wallet.low_balance", "ws", {})
    assert RFC3339_MS.match(ev.occurred_at)
    with pytest.raises(ValueError):
        make_event("x", "ws", {"bad": float("nan")})
    with pytest.raises(ValueError):
        make_event("", "ws", {})
