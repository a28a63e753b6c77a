"""Supervisor <-> worker transport: JSON lines over a socketpair, each line one protocol message
(gateway/workers/protocol.py). `Requester` adds request/reply on top: ids, futures, timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from gateway.workers.protocol import Ask, Reply, Request

log = logging.getLogger(__name__)

M = TypeVar("M")


class ChannelClosed(Exception):
    """The other side is gone: a request to it will never be answered. `sent`: whether the
    request had been written (the other side may have acted on it before it went)."""

    def __init__(self, sent: bool = False) -> None:
        super().__init__("the channel closed" + (" after the request was sent" if sent else ""))
        self.sent = sent


class Channel(Generic[M]):
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, adapter: TypeAdapter[M]
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.adapter = adapter

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def send(self, msg: BaseModel) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(msg.model_dump_json().encode() + b"\n")

    async def recv(self) -> M | None:
        """The next valid message, or None when the other side is gone."""
        while True:
            try:
                line = await self.reader.readline()
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                return None
            if not line:
                return None
            try:
                return self.adapter.validate_json(line)
            except ValidationError as e:
                # without the input: it may hold secrets (an Originate's webhook_secret)
                log.warning("ipc: dropped an invalid message: %s",
                            e.errors(include_input=False, include_url=False)[:1])

    def close(self) -> None:
        self.writer.close()


async def open_channel(sock: Any, adapter: TypeAdapter[M]) -> Channel[M]:
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    return Channel(reader, writer, adapter)


class Requester:
    """Requests over a channel, each answered by the `Reply` with its id (or a timeout).

    The supervisor's to a worker are `Request`s; a worker's to the supervisor (`ask=True`)
    are `Ask`s."""

    _ids = itertools.count(1)

    def __init__(self, channel: Channel[Any], *, ask: bool = False) -> None:
        self.channel = channel
        self._wrap: type[Request] | type[Ask] = Ask if ask else Request
        self._pending: dict[int, asyncio.Future[Reply]] = {}

    async def request(self, body: Any, timeout: float = 5.0) -> Reply:
        """Raises ChannelClosed (the other side is gone) or TimeoutError."""
        if self.channel.closed:
            raise ChannelClosed()
        rid = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self.channel.send(self._wrap(id=rid, body=body))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    def reply(self, msg: Reply) -> None:
        fut = self._pending.get(msg.id)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def close(self) -> None:
        """The channel closed: every waiting request fails now, none hangs."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(sent=True))
        self._pending.clear()
