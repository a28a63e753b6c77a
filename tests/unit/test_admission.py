"""The admission gate's arithmetic (media.admission): pure logic, no pjsua."""

from __future__ import annotations

import time

from media import admission
from media.admission import Admission


def test_full_draining_and_overloaded_refuse() -> None:
    gate = Admission(admit=2)
    assert gate.decide() is None
    gate.started(inbound=True)
    gate.started(inbound=True)
    assert gate.decide() == "full"
    gate.ended(inbound=True)
    assert gate.decide() is None
    gate.accepting = False
    assert gate.decide() == "draining"
    gate.accepting, gate.overloaded = True, True
    assert gate.decide() == "overloaded"
    assert gate.refused == 3


def test_recently_closed_sockets_count_until_the_queue_frees_them(monkeypatch) -> None:
    gate = Admission(admit=4, handles=64, fixed=2, tcp_reserve=16)  # 46 slots for media
    for _ in range(22):  # 22 calls' sockets closed just now: 44 slots still held
        gate.started(inbound=True)
        gate.ended(inbound=True)
    assert gate.keys_in_use() == 44
    assert gate.decide() is None  # 44 + 2 = 46
    gate.churned()
    assert gate.decide() == "sockets"
    later = time.monotonic() + admission.KEY_FREE_DELAY_S + 0.1
    monkeypatch.setattr(admission.time, "monotonic", lambda: later)
    assert gate.keys_in_use() == 0
    assert gate.decide() is None


def test_outbound_calls_hold_sockets_not_inbound_slots() -> None:
    gate = Admission(admit=1, handles=64, fixed=2, tcp_reserve=16)
    gate.started(inbound=False)
    assert gate.inbound == 0 and gate.keys_in_use() == 2
    assert gate.decide() is None
