import hashlib
import hmac
import time

import pytest

from gateway.events.envelope import make_event
from gateway.events.signing import SignatureError, sign, verify


# The receiver: the product quickstart's Python verifier, copied verbatim.
def verify_signature(raw_body: bytes, sig_header: str, secret: str) -> None:
    parts = dict(p.split("=", 1) for p in sig_header.split(","))
    ts = parts.get("t")
    v1 = parts.get("v1")
    if not ts or not v1:
        raise ValueError("missing t or v1 in signature header")
    if abs(time.time() - float(ts)) > 300:
        raise ValueError("timestamp too old")
    message = raw_body + b"." + ts.encode()
    expected = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(v1, expected):
        raise ValueError("signature mismatch")


SECRET = "whsec_test_ü_secret"


def test_seed_receiver_accepts_our_signature():
    body = make_event("call.completed", "ws", {"call_id": "c1", "x": "é"}).body
    header = sign(SECRET, body)
    verify_signature(body, header, SECRET)
    verify(body, header, SECRET)


def test_header_format():
    header = sign("s", b"{}", ts=1751000000)
    t, v1 = header.split(",")
    assert t == "t=1751000000"
    expected = hmac.new(b"s", b"{}.1751000000", hashlib.sha256).hexdigest()
    assert v1 == f"v1={expected}"


def test_seed_receiver_rejects_tampered_body():
    body = make_event("call.completed", "ws", {"duration_seconds": 295}).body
    header = sign(SECRET, body)
    tampered = body.replace(b"295", b"296")
    with pytest.raises(ValueError, match="signature mismatch"):
        verify_signature(tampered, header, SECRET)
    with pytest.raises(SignatureError):
        verify(tampered, header, SECRET)
    with pytest.raises(ValueError, match="signature mismatch"):
        verify_signature(body, header, "other-secret")


def test_seed_receiver_rejects_old_timestamp():
    body = b'{"kind":"x"}'
    old = sign(SECRET, body, ts=int(time.time()) - 301)
    with pytest.raises(ValueError, match="too old"):
        verify_signature(body, old, SECRET)
    with pytest.raises(SignatureError):
        verify(body, old, SECRET)
    # and the tolerance is configurable / the clock injectable
    verify(body, old, SECRET, tolerance_s=400)
    verify(body, old, SECRET, now=time.time() - 300)


@pytest.mark.parametrize("header", ["", "t=1", "v1=ab", "garbage", "t=abc,v1=00"])
def test_verify_malformed(header):
    with pytest.raises(SignatureError):
        verify(b"{}", header, SECRET)


def test_verify_accepts_any_of_several_v1():
    body = b"{}"
    good = sign(SECRET, body)
    t = good.split(",")[0]
    verify(body, f"{t},v1={'0' * 64},{good.split(',')[1]}", SECRET)
