"""Dialled number → route: the static `[[numbers]]` table, then the control plane, then the demo."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import aiohttp
from pydantic import ValidationError

from config.settings import NumberSettings, Settings
from gateway.events.signing import SIGNATURE_HEADER, sign

__all__ = ["Route", "Router", "RoutingError", "normalise_e164"]

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_S = 5.0  # the carrier is waiting for a SIP answer meanwhile

# Subscriber-number lengths (after the country code) for countries where carriers are known to
# send the bare national number without a trunk prefix, e.g. Kenya's "722000001".
_NSN_LENGTHS: dict[str, tuple[int, ...]] = {"254": (9,)}
_SEPARATORS = re.compile(r"[\s\-.()/]")


def normalise_e164(raw: str, default_cc: str = "254") -> str | None:
    """Best-effort E.164 from a Request-URI user part / tel URI; None when implausible.

    Accepts "+254 722-000-001", "tel:+254722000001;phone-context=...", "sip:0722000001@host",
    "%2B254722000001", "00254722000001", national "0722000001" and "254722000001".
    """
    s = unquote(raw).strip()
    low = s.lower()
    for scheme in ("sips:", "sip:", "tel:"):
        if low.startswith(scheme):
            s = s[len(scheme) :]
            break
    s = s.split("@", 1)[0].split(";", 1)[0]
    s = _SEPARATORS.sub("", s)
    if s.startswith("+"):
        digits = s[1:]
    elif s.startswith("00"):
        digits = s[2:]
    elif s.startswith("0"):
        digits = default_cc + s[1:]
    elif s.startswith(default_cc):
        digits = s
    elif len(s) in _NSN_LENGTHS.get(default_cc, ()):
        digits = default_cc + s
    else:
        digits = s  # international without '+'
    if not digits.isascii() or not digits.isdigit() or digits.startswith("0"):
        return None
    if not 8 <= len(digits) <= 15:
        return None
    return "+" + digits


class RoutingError(Exception):
    """The route could not be determined (control plane unreachable or erroring): SIP 503."""


@dataclass(frozen=True)
class Route:
    e164: str
    number_id: str
    workspace_id: str
    voice_callback_url: str
    voice_callback_method: Literal["POST", "GET"] = "POST"
    callback_body: Literal["form", "json"] = "form"
    events_url: str | None = None
    webhook_secret: str = field(default="", repr=False)  # plain here; never in repr/logs
    source: Literal["config", "control_plane", "demo"] = "config"

    @classmethod
    def from_number(
        cls, num: NumberSettings, source: Literal["config", "control_plane"] = "config"
    ) -> Route:
        return cls(
            e164=num.e164,
            number_id=num.number_id,
            workspace_id=num.workspace_id,
            voice_callback_url=num.voice_callback_url,
            voice_callback_method=num.voice_callback_method,
            callback_body=num.callback_body,
            events_url=num.events_url,
            webhook_secret=num.webhook_secret.get_secret_value(),
            source=source,
        )


class Router:
    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        timeout_s: float = RESOLVE_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._table = {n.e164: Route.from_number(n) for n in settings.numbers}

    async def resolve(self, to_e164: str, from_: str) -> Route | None:
        route = self._table.get(to_e164)
        if route is not None:
            return route
        cp = self._settings.control_plane
        if cp.resolve_url:
            # Settings guarantees the secret whenever resolve_url is set.
            secret = cp.secret.get_secret_value() if cp.secret else ""
            return await self._resolve_remote(cp.resolve_url, secret, to_e164, from_)
        return self.demo_route(to_e164)

    def demo_route(self, dialled: str) -> Route | None:
        """In demo mode (and only without a control plane to ask) any dialled user part, a
        phone number or not (`sip:1234@...`), reaches the built-in demo voice app."""
        s = self._settings
        if not s.demo.enabled or s.control_plane.resolve_url or not dialled:
            return None
        return Route(
            e164=dialled,
            number_id="demo",
            workspace_id="demo",
            voice_callback_url=f"{s.api.base_url}/demo/voice",
            source="demo",
        )

    async def _resolve_remote(
        self, url: str, secret: str, to_e164: str, from_: str
    ) -> Route | None:
        body = json.dumps({"to": to_e164, "from": from_}, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            SIGNATURE_HEADER: sign(secret, body),
            "User-Agent": self._settings.sip.user_agent,
        }
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise RoutingError(f"control plane resolve returned HTTP {resp.status}")
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RoutingError(f"control plane resolve failed: {type(exc).__name__}") from exc
        return self._parse_remote(raw, to_e164)

    @staticmethod
    def _parse_remote(raw: bytes, to_e164: str) -> Route:
        try:
            doc: Any = json.loads(raw)
        except ValueError as exc:
            raise RoutingError("control plane resolve reply is not JSON") from exc
        if not isinstance(doc, dict):
            raise RoutingError("control plane resolve reply is not a JSON object")
        # Tolerate extra fields from a newer control plane; validate the ones we use.
        known = {k: v for k, v in doc.items() if k in NumberSettings.model_fields}
        known.setdefault("e164", to_e164)
        try:
            num = NumberSettings.model_validate(known)
        except ValidationError as exc:
            bad = ", ".join(".".join(map(str, e["loc"])) or "<root>" for e in exc.errors())
            raise RoutingError(f"control plane resolve reply invalid: {bad}") from exc
        return Route.from_number(num, source="control_plane")
