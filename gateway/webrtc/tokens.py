"""Browser clients' SIP tokens: HS256 JWTs minted by the API, checked on every REGISTER and
INVITE the WebSocket front relays (Kamailio asks `POST /internal/webrtc/check`).

Keys rotate without logging anyone out: tokens are signed with the first configured key and
verified with whichever key their `kid` header names, so a new key goes in front of the list
and the old one is removed once the last token it signed has expired (`token_ttl_s`).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import jwt

ALGORITHM = "HS256"
ISSUER = "sautikit-gateway"
IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

RefusalCode = Literal[
    "token_missing", "token_malformed", "token_expired", "token_unknown_key",
    "token_bad_signature", "token_claims",
]


class TokenRefused(Exception):
    """Why a token is not accepted; `status` is the SIP answer (401: get a new token, 403: this
    token will never do)."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code: RefusalCode = code
        self.message = message

    @property
    def status(self) -> int:
        return 401 if self.code in ("token_missing", "token_expired") else 403


@dataclass(frozen=True)
class ClientClaims:
    identity: str  # `sub`: the client's name, `client:<identity>`
    number: str  # the E.164 number it calls from (and is reached as)
    role: str
    kid: str
    expires_at: int  # `exp`, seconds since the epoch
    token_id: str  # `jti`

    def remaining_s(self, now: float | None = None) -> int:
        return max(0, int(self.expires_at - (time.time() if now is None else now)))


class TokenAuthority:
    def __init__(self, keys: list[tuple[str, str]], ttl_s: int) -> None:
        if not keys:
            raise ValueError("no signing key")
        self._keys = dict(keys)
        self._signing = keys[0]
        self.ttl_s = ttl_s

    @property
    def signing_kid(self) -> str:
        return self._signing[0]

    def mint(self, identity: str, number: str, role: str = "client",
             now: float | None = None) -> tuple[str, ClientClaims]:
        if not IDENTITY_RE.match(identity):
            raise ValueError("client_name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter "
                             "or digit")
        if not ROLE_RE.match(role):
            raise ValueError("role: 1-32 of A-Z a-z 0-9 _ -")
        issued = int(time.time() if now is None else now)
        kid, secret = self._signing
        claims = ClientClaims(identity, number, role, kid, issued + self.ttl_s,
                              secrets.token_hex(8))
        payload: dict[str, Any] = {
            "iss": ISSUER, "sub": identity, "number": number, "role": role, "kid": kid,
            "iat": issued, "exp": claims.expires_at, "jti": claims.token_id,
        }
        return jwt.encode(payload, secret, algorithm=ALGORITHM, headers={"kid": kid}), claims

    def verify(self, token: str, now: float | None = None) -> ClientClaims:
        token = token.strip()
        if not token:
            raise TokenRefused("token_missing", "no token (Authorization: Bearer <token>)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenRefused("token_malformed", "not a JWT") from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM:
            raise TokenRefused("token_malformed", f"alg {header.get('alg')!r}; {ALGORITHM} only")
        secret = self._keys.get(kid) if isinstance(kid, str) else None
        if secret is None:
            raise TokenRefused("token_unknown_key", f"signed with key {kid!r}, not a current key")
        try:
            doc = jwt.decode(
                token, secret, algorithms=[ALGORITHM], issuer=ISSUER,
                # exp checked below against `now`; iat not at all (another node's clock)
                options={"require": ["exp", "sub", "iss"], "verify_exp": False,
                         "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise TokenRefused("token_bad_signature", f"signature does not match key {kid!r}") \
                from None
        except jwt.InvalidTokenError as e:
            raise TokenRefused("token_malformed", f"invalid token: {e}") from None
        exp = doc.get("exp")
        sub, number, role = doc.get("sub"), doc.get("number"), doc.get("role", "client")
        if not (isinstance(exp, int) and isinstance(sub, str) and IDENTITY_RE.match(sub)
                and isinstance(number, str) and number and isinstance(role, str)):
            raise TokenRefused("token_claims", "claims sub, number and exp are required")
        t = time.time() if now is None else now
        if exp <= t:  # no leeway: a replay after expiry is a replay
            raise TokenRefused("token_expired", f"expired {int(t - exp)} s ago")
        return ClientClaims(sub, number, role, str(kid), exp, str(doc.get("jti", "")))
