"""A minimal SIP-over-WebSocket client (RFC 7118) for REGISTER tests and the REGISTER bench:
what a browser's JsSIP sends, without a browser, so status codes and timings are exact."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class SipReply:
    code: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, last value
    rtt_ms: float = 0.0

    @property
    def contact_expires(self) -> int | None:
        m = re.search(r";\s*expires=(\d+)", self.headers.get("contact", ""), re.I)
        return int(m.group(1)) if m else None


def parse_reply(text: str) -> SipReply:
    head = text.split("\r\n\r\n", 1)[0]
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return SipReply(int(parts[1]), parts[2] if len(parts) > 2 else "", headers)


class WsSipClient:
    """One WebSocket to the front, registering `identity` at `domain`."""

    def __init__(self, url: str, identity: str, domain: str) -> None:
        self.url, self.identity, self.domain = url, identity, domain
        self.host = f"{secrets.token_hex(4)}.invalid"
        self.call_id = secrets.token_hex(10)
        self.tag = secrets.token_hex(4)
        self.contact = f"sip:{secrets.token_hex(4)}@{self.host};transport=ws"
        self.cseq = 0
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def __aenter__(self) -> WsSipClient:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.url, protocols=("sip",))
        assert self._ws.protocol == "sip", self._ws.protocol
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def register(self, token: str | None, expires: int = 600, *,
                       user: str | None = None, timeout: float = 5.0) -> SipReply:
        assert self._ws is not None
        self.cseq += 1
        aor = f"sip:{user or self.identity}@{self.domain}"
        auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
        msg = (
            f"REGISTER sip:{self.domain} SIP/2.0\r\n"
            f"Via: SIP/2.0/WS {self.host};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            "Max-Forwards: 70\r\n"
            f"To: <{aor}>\r\n"
            f"From: <{aor}>;tag={self.tag}\r\n"
            f"Call-ID: {self.call_id}\r\n"
            f"CSeq: {self.cseq} REGISTER\r\n"
            f"{auth}"
            f"Contact: <{self.contact}>;expires={expires}\r\n"
            f"Expires: {expires}\r\n"
            "User-Agent: sautikit-tests\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        return await self._final(msg, "REGISTER", timeout)

    async def options(self, timeout: float = 5.0) -> SipReply:
        """OPTIONS sip:<domain>: the REGISTER's headers minus Authorization (Kamailio answers
        it itself, no token check): the baseline round trip of this socket."""
        self.cseq += 1
        msg = (
            f"OPTIONS sip:{self.domain} SIP/2.0\r\n"
            f"Via: SIP/2.0/WS {self.host};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            "Max-Forwards: 70\r\n"
            f"To: <sip:{self.domain}>\r\n"
            f"From: <sip:{self.identity}@{self.domain}>;tag={self.tag}\r\n"
            f"Call-ID: {self.call_id}\r\n"
            f"CSeq: {self.cseq} OPTIONS\r\n"
            f"Contact: <{self.contact}>\r\n"
            "User-Agent: sautikit-tests\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        return await self._final(msg, "OPTIONS", timeout)

    async def _final(self, msg: str, method: str, timeout: float) -> SipReply:
        """Send `msg`; its final answer, timed from the send."""
        assert self._ws is not None
        t0 = time.perf_counter()
        await self._ws.send_str(msg)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no final answer to {method}")
            frame = await self._ws.receive(timeout=left)
            if frame.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"websocket {frame.type}: {frame.data!r}")
            reply = parse_reply(frame.data)
            if reply.code >= 200:
                reply.rtt_ms = (time.perf_counter() - t0) * 1000
                return reply
