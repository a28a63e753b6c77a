"""The receiving side exactly as the product's public docs tell customers to write it.

`verify_signature` is the quickstart's Python verifier, copied verbatim: tests check what the
gateway sends against the docs' own algorithm, not against the gateway's signing code.
"""

import hashlib
import hmac
import time


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
