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


def test_an_outbound_leg_never_takes_the_slot_refusals_run_in() -> None:
    # pjsua answers 486 itself, before the gate, when all max_calls slots are up: with an
    # outbound call among them the gate keeps the last one free and refuses with 503 instead.
    gate = Admission(admit=3, max_calls=4)
    gate.started(inbound=True)
    gate.started(inbound=True)
    assert gate.start_outbound() is True  # 3 of 4 slots
    assert gate.decide() == "full"  # 2 inbound < admit, but this INVITE would take the last
    assert gate.start_outbound() is False  # nor may another outbound leg
    assert (gate.media_calls, gate.inbound, gate.outbound) == (3, 2, 1)
    assert gate.free_slots() == 0
    gate.ended(inbound=False)
    assert gate.outbound == 0 and gate.decide() is None and gate.free_slots() == 1


def test_outbound_calls_alone_fill_all_but_the_refusal_slot() -> None:
    gate = Admission(admit=4, max_calls=4)
    assert gate.free_slots() == 3
    assert [gate.start_outbound() for _ in range(4)] == [True, True, True, False]
    assert gate.decide() == "full"
    # a dial leg of a call on this process may take the last slot itself
    assert gate.start_outbound(last_slot=True) is True
    assert gate.start_outbound(last_slot=True) is False
    assert gate.media_calls == 4 and gate.free_slots() == 0


def test_inbound_only_keeps_admit_as_its_limit() -> None:
    # Without outbound calls nothing changes: admit may be every slot (reserved_slots = 0).
    gate = Admission(admit=4, max_calls=4)
    for _ in range(3):
        gate.started(inbound=True)
    assert gate.decide() is None
    gate.started(inbound=True)
    assert gate.decide() == "full"
    assert gate.start_outbound() is False


def test_a_slot_pjsua_still_holds_after_disconnected_counts_until_timer_b(monkeypatch) -> None:
    # An outbound INVITE cancelled before any response: DISCONNECTED at once, but pjsua frees
    # its slot only when the INVITE transaction times out (Timer B).
    now = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])
    gate = Admission(admit=4, max_calls=4)
    assert gate.start_outbound() and gate.start_outbound()
    gate.ended(inbound=False, slot_held_until=now[0] - 1 + admission.TIMER_B_S)
    gate.ended(inbound=False, slot_held_until=now[0] - 5)  # already past: freed now
    assert (gate.media_calls, gate.outbound, gate.free_slots()) == (1, 1, 2)
    assert gate.keys_in_use() == 2 * (1 + 1)  # the held call + the other's closing sockets
    now[0] += admission.TIMER_B_S - 1.5
    assert gate.free_slots() == 2
    now[0] += 0.6
    assert gate.free_slots() == 3 and gate.outbound == 0 and gate.decide() is None
