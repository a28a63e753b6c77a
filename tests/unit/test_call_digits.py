"""How a call hands DTMF keys to whoever waits for them (media.call.SipCall): buffered when
nobody waits, straight into the waiting future otherwise, never lost to a timeout or a cancel.
Pure asyncio logic: the pjsua2 call and endpoint are stand-ins, keys arrive as the pump's
callbacks would deliver them on the loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pjsua2 as pj
import pytest

from media.call import CallGone, SipCall


class _Endpoint:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.calls: dict[int, Any] = {}
        self.buried: list[Any] = []

    def _bury(self, pj_call: Any) -> None:
        self.buried.append(pj_call)


class _PjCall:
    owner: Any = None


def _call() -> SipCall:
    return SipCall(_Endpoint(), _PjCall(), "outbound")  # type: ignore[arg-type]


def _key(call: SipCall, digit: str) -> None:
    call._on_dtmf(digit, "rfc4733")


def _hang_up(call: SipCall) -> None:
    call._on_state(pj.PJSIP_INV_STATE_DISCONNECTED, 200, "OK", time.time(), time.monotonic(), "")


async def test_keys_nobody_waits_for_are_kept_in_order() -> None:
    call = _call()
    for d in "12#":
        _key(call, d)
    assert await call.next_digit(1) == "1"
    assert call.next_digit_nowait() == "2"
    assert await call.next_digit(None) == "#"
    assert call.next_digit_nowait() is None


async def test_a_waiting_reader_gets_the_key_and_a_timeout_loses_none() -> None:
    call = _call()
    waiting = asyncio.create_task(call.next_digit(5))
    await asyncio.sleep(0)
    _key(call, "7")
    assert await waiting == "7"
    assert await call.next_digit(0.01) is None  # timed out
    _key(call, "8")  # after the timeout: buffered for the next reader
    assert call.next_digit_nowait() == "8"


async def test_a_key_that_reached_a_cancelled_reader_stays_buffered() -> None:
    call = _call()
    waiting = asyncio.create_task(call.next_digit(None))
    await asyncio.sleep(0)
    _key(call, "5")  # resolves the reader's future...
    waiting.cancel()  # ...which is cancelled before it runs again (barge-in, interrupt)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert call.next_digit_nowait() == "5"


async def test_the_call_ending_wakes_a_reader_with_call_gone() -> None:
    call = _call()
    waiting = asyncio.create_task(call.next_digit(None))
    timed = asyncio.create_task(call.next_digit(30))
    await asyncio.sleep(0)
    _hang_up(call)
    for task in (waiting, timed):
        with pytest.raises(CallGone):
            await task
    with pytest.raises(CallGone):
        await call.next_digit(1)
