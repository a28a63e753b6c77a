"""Webhook signatures: `X-Sautikit-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, body.t)>`.

Mirrors the public quickstart's `verify_signature`: the HMAC message is the raw body bytes, a
dot, then the timestamp exactly as written in the header.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Sautikit-Signature"


class SignatureError(ValueError):
    """The signature header is missing parts, stale, or does not match the body."""


def _digest(secret: str, body: bytes, ts: str) -> str:
    return hmac.new(secret.encode(), body + b"." + ts.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, ts: int | None = None) -> str:
    """The header value for `body`, timestamped `ts` (default: now)."""
    t = str(int(time.time()) if ts is None else int(ts))
    return f"t={t},v1={_digest(secret, body, t)}"


def verify(
    body: bytes,
    header: str,
    secret: str,
    tolerance_s: float = 300,
    now: float | None = None,
) -> None:
    """Raise SignatureError unless `header` signs `body` with `secret` within `tolerance_s`."""
    ts: str | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header")
        if key == "t":
            ts = value
        elif key == "v1":
            candidates.append(value)  # several v1 values are allowed during secret rotation
    if not ts or not candidates:
        raise SignatureError("missing t or v1 in signature header")
    try:
        t = int(ts)
    except ValueError:
        raise SignatureError("timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - t) > tolerance_s:
        raise SignatureError("timestamp outside tolerance")
    expected = _digest(secret, body, ts)
    if not any(hmac.compare_digest(v.encode(), expected.encode()) for v in candidates):
        raise SignatureError("signature mismatch")
