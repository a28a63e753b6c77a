"""Browser-calling set-up shared by the WebRTC tests: a node config with `[webrtc]` on its own
loopback ports, and tokens made the way the gateway makes them (to sign with a removed key)."""

from __future__ import annotations

import itertools
import os
import socket

from gateway.demo import free_port, free_port_block
from gateway.webrtc.tokens import TokenAuthority
from tests import tones
from tests.integration.ws_agent import wav_bytes

DOMAIN = "webrtc.test.invalid"
KEY_NEW = ("k2", "new-key-0123456789abcdef0123456789abcdef")
KEY_OLD = ("k1", "old-key-0123456789abcdef0123456789abcdef")
KEY_REMOVED = ("k0", "removed-key-0123456789abcdef0123456789ab")
_blocks = itertools.count()


def rtp_range() -> tuple[int, int]:
    """rtpengine's ports for one node: above the workers' blocks (conftest.rtp_block)."""
    lo = 56000 + 200 * (os.getpid() % 20) + 40 * (next(_blocks) % 5)
    return lo, lo + 39


def webrtc_section(*, ttl_s: int = 300, keys: tuple[tuple[str, str], ...] = (KEY_NEW, KEY_OLD),
                   ws_port: int | None = None) -> tuple[str, int]:
    """(TOML to pass as write_config's `extra`, the WebSocket port)."""
    ws_port = ws_port or free_port()
    lo, hi = rtp_range()
    text = (
        f'[webrtc]\nenabled = true\nws_listen = "127.0.0.1:{ws_port}"\ndomain = "{DOMAIN}"\n'
        f"token_ttl_s = {ttl_s}\nrtpengine_ng_port = {free_port(socket.SOCK_DGRAM)}\n"
        f"rtp_port_min = {lo}\nrtp_port_max = {hi}\n"
    )
    for kid, secret in keys:
        text += f'[[webrtc.keys]]\nkid = "{kid}"\nsecret = "{secret}"\n'
    return text, ws_port


def token(key: tuple[str, str], identity: str, number: str, *, ttl_s: int = 300,
          now: float | None = None) -> str:
    return TokenAuthority([key], ttl_s).mint(identity, number, now=now)[0]


FRONT = 'mode = "managed"\nping_interval_s = 1\n'


def two_workers(calls: int = 4) -> str:
    """Two workers of `calls` calls on free SIP ports (tests run side by side)."""
    return (f"count = 2\ncalls_per_worker = {calls}\nreserved_slots = 0\n"
            f"sip_port_start = {free_port_block(2)}")


def tone_wav_bytes(freq: float, seconds: float, rate: int = 8000) -> bytes:
    """A steady tone at -10 dBFS as a 16-bit mono WAV (what the voice apps play)."""
    pcm = (tones.sine(freq, seconds, rate, 0.3) * 32767).astype("<i2").tobytes()
    return wav_bytes(pcm, rate)
