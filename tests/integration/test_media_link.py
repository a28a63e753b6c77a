"""MediaLink's jitter queue, fed datagrams by hand (the port is in the `phone` endpoint's bridge
but connected to nothing, so the clock thread never asks it for frames: the test does)."""

from __future__ import annotations

import socket
import struct
import time

import pjsua2 as pj
import pytest

from media.link import JITTER_FRAMES, TRIM_WINDOW, MediaLink, _pcm_of, pooled_ports

pytestmark = pytest.mark.integration


def frame_of(n: int, size: int) -> bytes:
    return bytes([n % 256]) * size


@pytest.fixture
def link(phone):
    lk = MediaLink(phone.cfg.clock_rate)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    lk.connect(peer.getsockname())
    peer.connect(lk.local_addr)
    yield lk, peer
    lk.close()
    peer.close()


def send(peer, lk, *seqs, size=None):
    for s in seqs:
        peer.send(struct.pack("!I", s) + frame_of(s, size or lk.frame_bytes))
    time.sleep(0.02)


def request(lk) -> bytes:
    f = pj.MediaFrame()
    lk._on_frame_requested(f)
    assert f.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and f.size == lk.frame_bytes
    return _pcm_of(f.buf)


def test_plays_in_order_drops_late_and_overflow(link):
    lk, peer = link
    assert request(lk) == bytes(lk.frame_bytes)  # nothing yet: silence
    send(peer, lk, 0, 1, 3, 2)  # 2 arrives after 3: late
    assert [request(lk)[0] for _ in range(3)] == [0, 1, 3]
    send(peer, lk, 4, 5, 6, 7, 8)  # a burst beyond the queue: the oldest go
    got = [request(lk)[0] for _ in range(JITTER_FRAMES)]
    assert got == [6, 7, 8]
    s = lk.stats()
    assert s.dropped_late == 1 + 2 and s.played == 6 and s.silence == 1 and s.errors == 0
    send(peer, lk, 9, size=10)  # malformed: counted when the next request drains it
    assert request(lk) == bytes(lk.frame_bytes)
    assert lk.stats().errors == 1 and lk.stats().received == 9


def test_standing_queue_is_trimmed(link):
    lk, peer = link
    send(peer, lk, 0, 1)
    seq = 2
    for _ in range(TRIM_WINDOW):  # one in, one out: the queue stays 2 deep
        request(lk)
        send(peer, lk, seq)
        seq += 1
    assert lk.stats().trimmed == 1


def test_frames_from_elsewhere_are_ignored_and_sends_go_to_the_peer(link, phone):
    lk, peer = link
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.sendto(struct.pack("!I", 0) + frame_of(0, lk.frame_bytes), lk.local_addr)
    other.close()
    time.sleep(0.02)
    assert request(lk) == bytes(lk.frame_bytes) and lk.stats().received == 0
    f = pj.MediaFrame()
    f.buf = pj.ByteVector(frame_of(7, lk.frame_bytes))
    f.size = lk.frame_bytes
    f.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
    lk._on_frame_received(f)
    data = peer.recv(2048)
    assert struct.unpack("!I", data[:4])[0] == 0 and data[4:] == frame_of(7, lk.frame_bytes)


def test_closed_links_ports_are_reused(phone):
    a, b = MediaLink(phone.cfg.clock_rate), MediaLink(phone.cfg.clock_rate)
    a.close()
    a.close()  # idempotent
    b.close()
    assert a.closed and a.audio_media.owner is None
    time.sleep(0.3)  # past RELEASE_DELAY_S
    made = pooled_ports()
    links = [MediaLink(phone.cfg.clock_rate) for _ in range(2)]
    try:
        assert pooled_ports() == made  # no new port while pooled ones are free
        assert all(lk.audio_media.owner is lk for lk in links)
    finally:
        for lk in links:
            lk.close()
