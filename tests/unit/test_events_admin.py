import time

import pytest

from gateway.events.admin import format_dead_letters, retry_dead_letter
from gateway.events.envelope import make_event
from gateway.events.outbox import Outbox


def test_format_and_retry(tmp_path):
    ob = Outbox(tmp_path / "outbox.sqlite3")
    assert format_dead_letters(ob) == ""
    ev = make_event("call.completed", "ws", {"call_id": "c1"})
    ob.append(
        ev,
        url="https://u:pw@hooks.example/e?token=t0k",
        secret="whsec_x",
        policy="customer",
        call_id="c1",
        final=True,
    )
    other = make_event("wallet.low_balance", "ws", {})
    ob.append(
        other, url="https://hooks.example/w", secret="whsec_y", policy="customer", call_id=None
    )
    for r in ob.due(time.time(), 10):
        ob.mark_failed(r.id, "HTTP 500:\tupstream\nbroke", None)

    text = format_dead_letters(ob)
    lines = text.splitlines()
    assert len(lines) == 2
    first = lines[0].split("\t")
    row = ob.get(ev.event_id)
    assert row is not None
    assert first == [
        str(row.id),
        ev.event_id,
        "call.completed",
        "c1",
        "attempts=1",
        "HTTP 500: upstream broke",
        "https://hooks.example/e?…",
    ]
    assert lines[1].split("\t")[3] == "-"
    assert "whsec" not in text and "pw" not in text and "t0k" not in text

    assert "re-queued" in retry_dead_letter(ob, ev.event_id)
    assert "not dead_letter" in retry_dead_letter(ob, str(row.id))
    assert "re-queued" in retry_dead_letter(ob, str(ob.get(other.event_id).id))  # type: ignore[union-attr]
    assert format_dead_letters(ob) == ""
    with pytest.raises(KeyError):
        retry_dead_letter(ob, "01900000-0000-7000-8000-000000000000")
    with pytest.raises(KeyError):
        retry_dead_letter(ob, "12345")
    ob.close()
