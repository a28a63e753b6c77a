"""The worker protocol: tagged messages round-trip; requests get their reply or fail fast."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.control.hangup import Hangup
from gateway.control.redirect import Redirect
from gateway.workers import protocol as p
from gateway.workers.ipc import ChannelClosed, Requester, open_channel


def test_messages_round_trip_by_tag() -> None:
    req = p.Request(id=7, body=Redirect(call_id="c1", actions=[{"hangup": {}}]))
    back = p.TO_WORKER.validate_json(req.model_dump_json())
    assert isinstance(back, p.Request) and isinstance(back.body, Redirect)
    assert back.body.actions == [{"hangup": {}}]
    ended = p.CallEnded(call_id="c1", status="busy", ended_at=1.0, sip_code=486)
    assert p.FROM_WORKER.validate_json(ended.model_dump_json()) == ended


def test_redirect_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError):
        Redirect(call_id="c")
    with pytest.raises(ValueError):
        Redirect(call_id="c", url="http://x", actions=[])


async def test_request_reply_timeout_and_closed_channel() -> None:
    a, b = socket.socketpair()
    sup = await open_channel(a, p.FROM_WORKER)
    wrk = await open_channel(b, p.TO_WORKER)
    req = Requester(sup)

    async def worker() -> None:
        msg = await wrk.recv()
        assert isinstance(msg, p.Request) and isinstance(msg.body, Hangup)
        wrk.send(p.Reply(id=msg.id, ok=True, result={"status": "hung_up"}))

    async def pump() -> None:
        while (m := await sup.recv()) is not None:
            if isinstance(m, p.Reply):
                req.reply(m)
        req.close()

    pumping = asyncio.ensure_future(pump())
    serving = asyncio.ensure_future(worker())
    reply = await req.request(Hangup(call_id="c1"), timeout=2)
    assert reply.ok and reply.result == {"status": "hung_up"}
    await serving
    with pytest.raises(TimeoutError):  # nobody answers this one
        await req.request(Hangup(call_id="c2"), timeout=0.05)
    waiting = asyncio.ensure_future(req.request(Hangup(call_id="c3"), timeout=5))
    await asyncio.sleep(0.01)
    wrk.close()  # the worker is gone: the waiting request fails at once, it does not hang
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiting, 1)
    await pumping
    sup.close()


async def test_worker_asks_the_supervisor_and_gets_its_reply() -> None:
    """The reverse direction: a worker's `Ask` is answered by a `Reply` with its id, and ids of
    the two directions never mix (a Reply to the worker is not one to the supervisor)."""
    a, b = socket.socketpair()
    sup = await open_channel(a, p.FROM_WORKER)
    wrk = await open_channel(b, p.TO_WORKER)
    asker = Requester(wrk, ask=True)

    async def supervisor() -> None:
        msg = await sup.recv()
        assert isinstance(msg, p.Ask) and isinstance(msg.body, Hangup)
        sup.send(p.Reply(id=msg.id, ok=True, result={"asked": msg.body.call_id}))

    async def worker_side() -> p.Reply:
        got = await wrk.recv()
        assert isinstance(got, p.Reply)
        asker.reply(got)
        return got

    task = asyncio.create_task(supervisor())
    reader = asyncio.create_task(worker_side())
    reply = await asker.request(Hangup(call_id="c9"), timeout=2)
    assert reply.ok and reply.result == {"asked": "c9"}
    await task
    await reader
    sup.close()
    wrk.close()
