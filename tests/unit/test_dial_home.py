"""The home's view of its legs: progress never goes backwards, and what an unanswered dial
reports (no-answer before busy before failed)."""

from __future__ import annotations

import asyncio

from dsl.context import DialTarget
from gateway.control.dial_progress import LegProgress
from gateway.dial.home import LegHandle, _unanswered


def leg(call_id: str = "leg-1") -> LegHandle:
    return LegHandle(call_id, DialTarget("number", "+254711000001"), asyncio.Event())


def progress(state: str, **kw: object) -> LegProgress:
    return LegProgress(call_id="leg-1", parent_call_id="p", state=state, **kw)  # type: ignore[arg-type]


def test_progress_only_moves_forward() -> None:
    h = leg()
    h.update(progress("early"))
    h.update(progress("ringing", sip_code=180))  # a late 180 after early media
    assert h.state == "early" and h.changed.is_set()
    h.update(progress("answered", answered_at=5.0))
    h.update(progress("ended", status="completed", sip_code=200, ended_at=9.0))
    h.update(progress("answered", answered_at=7.0))
    assert (h.state, h.status, h.answered_at, h.ended_at) == ("ended", "completed", 5.0, 9.0)


def test_an_unanswered_dial_reports_the_most_telling_leg() -> None:
    a, b, c = leg("a"), leg("b"), leg("c")
    for h, status, code in ((a, "failed", 503), (b, "busy", 486), (c, "no_answer", 487)):
        h.worker = 0
        h.update(progress("ended", status=status, sip_code=code))
    assert _unanswered([a, b, c]).status == "no-answer"
    assert (_unanswered([a, b]).status, _unanswered([a, b]).call_sid) == ("busy", "b")
    never = leg("d")
    never.failed("no_trunk")  # never placed: no DialCallSid
    assert (_unanswered([never]).status, _unanswered([never]).call_sid) == ("failed", "")
