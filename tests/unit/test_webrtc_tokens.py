"""Browser tokens: minted and verified like the front's check does, keys rotating."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from gateway.webrtc.tokens import TokenAuthority, TokenRefused

NEW = ("k2", "n" * 32)
OLD = ("k1", "o" * 32)


def refusal(auth: TokenAuthority, token: str, now: float | None = None) -> tuple[str, int]:
    with pytest.raises(TokenRefused) as e:
        auth.verify(token, now)
    return e.value.code, e.value.status


def test_mint_and_verify_with_rotation() -> None:
    t0 = 1_800_000_000.0
    old_only = TokenAuthority([OLD], 300)
    rotated = TokenAuthority([NEW, OLD], 300)
    issued_before, _ = old_only.mint("alice", "+254700000001", "agent", now=t0)
    token, claims = rotated.mint("bob", "+254700000002", now=t0)
    assert jwt.get_unverified_header(token)["kid"] == "k2" and claims.kid == "k2"
    got = rotated.verify(token, now=t0 + 299)
    assert (got.identity, got.number, got.role, got.remaining_s(t0 + 299)) == (
        "bob", "+254700000002", "client", 1)
    # a token of the previous key lives out its time, then is refused like any expired one
    assert rotated.verify(issued_before, now=t0 + 10).identity == "alice"
    assert refusal(rotated, issued_before, now=t0 + 300) == ("token_expired", 401)
    # once the old key is removed, its tokens are refused at once
    assert refusal(TokenAuthority([NEW], 300), issued_before, now=t0) == \
        ("token_unknown_key", 403)


def test_what_is_refused() -> None:
    auth = TokenAuthority([NEW], 300)
    now = time.time()
    assert refusal(auth, "") == ("token_missing", 401)
    assert refusal(auth, "x.y.z") == ("token_malformed", 403)
    forged = TokenAuthority([("k2", "f" * 32)], 300).mint("alice", "+254700000001")[0]
    assert refusal(auth, forged) == ("token_bad_signature", 403)
    # alg none / another algorithm: refused before any key is tried
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": "k2"}).encode())
    body = base64.urlsafe_b64encode(json.dumps({"sub": "a", "exp": now + 60}).encode())
    assert refusal(auth, f"{header.decode()}.{body.decode()}.") == ("token_malformed", 403)
    no_number = jwt.encode({"iss": "sautikit-gateway", "sub": "a", "exp": int(now) + 60},
                           NEW[1], algorithm="HS256", headers={"kid": "k2"})
    assert refusal(auth, no_number) == ("token_claims", 403)
    other_issuer = jwt.encode({"iss": "x", "sub": "a", "number": "+1", "exp": int(now) + 60},
                              NEW[1], algorithm="HS256", headers={"kid": "k2"})
    assert refusal(auth, other_issuer)[0] == "token_malformed"
    with pytest.raises(ValueError, match="client_name"):
        auth.mint("bad name", "+254700000001")
    with pytest.raises(ValueError, match="role"):
        auth.mint("alice", "+254700000001", role="x" * 40)
