"""The call directory: where calls are, and placement of new legs on free slots."""

from __future__ import annotations

import asyncio

from gateway.calls.directory import CallDirectory
from gateway.calls.identity import CallIdentity


def ident(call_id: str) -> CallIdentity:
    return CallIdentity(call_id, "outbound", "+254700000001", "+254722000001", "n", "w", 0.0)


def test_reserve_prefers_the_most_free_and_counts_reservations() -> None:
    d = CallDirectory()
    for i in range(3):
        d.worker_ready(i, 4)
    d.update(0, ident("a"), "ringing", None)
    d.update(0, ident("b"), "ringing", None)
    d.update(1, ident("c"), "ringing", None)
    assert d.reserve() == 2  # 4 free
    assert d.reserve() in (1, 2)  # 3 free each now
    picks = [d.reserve() for _ in range(5)]
    assert None not in picks
    assert d.free_slots() == 12 - 3 - 7 == 2
    assert d.reserve() is not None and d.reserve() is not None
    assert d.reserve() is None  # every slot is taken or reserved


def test_release_and_end_free_slots_and_wake_waiters() -> None:
    async def main() -> None:
        d = CallDirectory()
        d.worker_ready(0, 1)
        d.update(0, ident("a"), "in-progress", 1.0)
        assert d.reserve() is None
        waiter = asyncio.ensure_future(d.wait_for_slot(1.0))
        await asyncio.sleep(0)
        assert d.ended("a") is not None
        assert await waiter is True
        w = d.reserve()
        assert w == 0
        assert d.reserve() is None
        d.release(0)
        assert d.reserve() == 0
        assert await d.wait_for_slot(0.01) is False

    asyncio.run(main())


def test_exclusions_and_workers_not_ready() -> None:
    d = CallDirectory()
    d.worker_ready(0, 4)
    d.worker_ready(1, 4)
    assert d.reserve(exclude={0, 1}) is None
    assert d.reserve(exclude={0}) == 1
    lost = d.update(1, ident("x"), "ringing", None)[0]
    assert d.worker_gone(1) == [lost]
    assert d.get("x") is None
    assert d.reserve(exclude={0}) is None  # worker 1 is not ready again yet


def test_update_reports_the_previous_trunk() -> None:
    d = CallDirectory()
    d.worker_ready(0, 4)
    assert d.update(0, ident("x"), "ringing", None, "first")[1] == "first"
    assert d.update(0, ident("x"), "ringing", None, "second")[1] == "first"
    assert d.get("x").trunk == "second"  # type: ignore[union-attr]
