"""Dialled number → route: the static `[[numbers]]` table, then the control plane, then the demo."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from pydantic import ValidationError

from config.settings import NumberSettings, Settings
from dsl.phone import InvalidNumber, normalise_e164, parse_e164, set_default_region
from gateway.events.signing import SIGNATURE_HEADER, sign

__all__ = [
    "InvalidNumber",
    "Route",
    "Router",
    "RoutingError",
    "dialled",
    "normalise_e164",
    "parse_e164",
    "set_default_region",
]

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_S = 5.0  # the carrier is waiting for a SIP answer meanwhile


def dialled(raw: str) -> tuple[str | None, str]:
    """(E.164, "") for a Request-URI user part, or (None, why it is not a phone number)."""
    try:
        return parse_e164(raw), ""
    except InvalidNumber as e:
        return None, e.reason


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
