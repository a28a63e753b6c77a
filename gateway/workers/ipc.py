"""Supervisor <-> worker messages: JSON lines over a socketpair.

The channel is for coordination (ready, which calls are live, "the outbox has new rows");
events themselves go through the SQLite outbox, so nothing billing-relevant rides on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger(__name__)


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the other side is gone."""
        while True:
            try:
                line = await self.reader.readline()
            except (ConnectionError, asyncio.IncompleteReadError):
                return None
            if not line:
                return None
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("ipc: dropped a malformed line")
                continue
            if isinstance(msg, dict):
                return msg

    def close(self) -> None:
        self.writer.close()


async def open_channel(sock: Any) -> Channel:
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    return Channel(reader, writer)
