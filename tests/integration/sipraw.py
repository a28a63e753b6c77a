"""A raw SIP peer for hostile and malformed traffic: builds requests as bytes, sends them over
UDP or TCP, reads what comes back. No SIP stack: that is the point."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
from typing import Any

from tests.integration.conftest import NUMBER


def invite(
    port: int,
    lport: int,
    *,
    transport: str = "UDP",
    headers: str = "",
    vias: int = 0,
    body: str = "",
    to_tag: str = "",
    ruri: str = "",
    method: str = "INVITE",
    lhost: str = "127.0.0.1",
) -> tuple[str, bytes]:
    """(Call-ID, bytes) of a minimal request from lhost:lport."""
    call_id = secrets.token_hex(8)
    sdp = body or (
        "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 9 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n"
    )
    if method != "INVITE":
        sdp = ""
    extra_vias = "".join(
        f"Via: SIP/2.0/UDP 10.{i // 250}.{i % 250}.1:5060;branch=z9hG4bK{i}x\r\n"
        for i in range(vias)
    )
    tag = f";tag={to_tag}" if to_tag else ""
    msg = (
        f"{method} {ruri or f'sip:{NUMBER}@127.0.0.1:{port}'} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {lhost}:{lport};branch=z9hG4bK{secrets.token_hex(6)};rport\r\n"
        f"{extra_vias}"
        f"From: <sip:+254722000001@{lhost}:{lport}>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:{NUMBER}@127.0.0.1:{port}>{tag}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:+254722000001@{lhost}:{lport};transport={transport.lower()}>\r\n"
        "Max-Forwards: 70\r\n"
        f"{headers}"
        + ("Content-Type: application/sdp\r\n" if sdp else "")
        + f"Content-Length: {len(sdp.encode())}\r\n\r\n{sdp}"
    )
    return call_id, msg.encode()


class UdpPeer:
    """A raw UDP SIP peer: sends bytes, collects what arrives."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.host, self.port = self.sock.getsockname()

    def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, ("127.0.0.1", port))

    async def replies(self, seconds: float) -> list[str]:
        """Everything received within `seconds` (the socket is drained afterwards)."""
        loop = asyncio.get_running_loop()
        got: list[str] = []
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 70000), left)
            except TimeoutError:
                break
            got.append(data.decode(errors="replace"))
        return got

    async def final(self, seconds: float = 3.0, method: str = "", call_id: str = "") -> str | None:
        """The first final answer (>= 200) within `seconds` (to `method` if given: answers to
        an earlier BYE are skipped); None without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 70000), left)
            except TimeoutError:
                return None
            text = data.decode(errors="replace")
            cseq = re.search(r"^CSeq:\s*\d+\s+(\S+)", text, re.M | re.I)
            if method and (not cseq or cseq.group(1) != method):
                continue
            if call_id and not re.search(
                rf"^Call-ID:\s*{re.escape(call_id)}\s*$", text, re.M | re.I
            ):
                continue
            if re.match(r"SIP/2\.0 [2-6]\d\d", text):
                return text
        return None

    def ack_and_bye(self, reply: str, port: int) -> None:
        """ACK a 2xx and hang up right away (along the route set, to the Contact it gave)."""
        for msg in ack_and_bye(reply, self.host, self.port, "UDP"):
            self.send(msg, port)

    def close(self) -> None:
        self.sock.close()


def ack_and_bye(reply: str, host: str, port: int, transport: str) -> list[bytes]:
    """The ACK and the BYE for the 2xx `reply`, sent from host:port."""
    head = reply.split("\r\n\r\n", 1)[0]
    hdr: dict[str, str] = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        hdr.setdefault(name.strip().lower(), value.strip())
    routes = "".join(
        f"Route: {r}\r\n"
        for r in reversed(re.findall(r"^Record-Route:\s*(.+)$", head, re.M | re.I))
    )
    m = re.search(r"<([^>]+)>", hdr["contact"])
    assert m, hdr["contact"]
    out = []
    for method, cseq in (("ACK", 1), ("BYE", 2)):
        out.append(
            (
                f"{method} {m.group(1)} SIP/2.0\r\n"
                f"Via: SIP/2.0/{transport} {host}:{port};branch=z9hG4bK{secrets.token_hex(6)}"
                ";rport\r\n"
                f"From: {hdr['from']}\r\nTo: {hdr['to']}\r\nCall-ID: {hdr['call-id']}\r\n"
                f"CSeq: {cseq} {method}\r\n{routes}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()
        )
    return out


@contextlib.contextmanager
def udp_peer(host: str = "127.0.0.1") -> Any:
    p = UdpPeer(host)
    try:
        yield p
    finally:
        p.close()


async def tcp_request(
    port: int, build: Any, seconds: float = 5.0, hang_up: bool = False
) -> str | None:
    """Send one request over TCP; the first final answer, or None. With `hang_up`, a 2xx is
    ACKed and the call hung up on the same connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lport = writer.get_extra_info("sockname")[1]
        writer.write(build(lport))
        await writer.drain()
        buf = b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                return None
            if not chunk:
                return None
            buf += chunk
            m = re.search(rb"SIP/2\.0 ([2-6]\d\d)[^\r]*\r\n", buf)
            if m and b"\r\n\r\n" in buf[m.start() :]:
                reply = buf[m.start() :].decode(errors="replace")
                if hang_up and reply.startswith("SIP/2.0 2"):
                    for msg in ack_and_bye(reply, "127.0.0.1", lport, "TCP"):
                        writer.write(msg)
                    await writer.drain()
                    await asyncio.sleep(0.5)  # the BYE's answer
                return reply
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
