"""SSRF guard for URLs taken from voice app documents (untrusted input).

Two layers: `check_url` before a request (scheme, userinfo, every resolved address), and a
session from `make_session` whose resolver drops forbidden addresses at connect time and whose
request hook refuses forbidden IP literals, so a DNS answer that changes between the check and
the connect (rebinding) still cannot reach a private address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

__all__ = [
    "ForbiddenAddressError",
    "GuardedResolver",
    "HostUnresolvable",
    "UrlForbidden",
    "check_url",
    "forbidden_reason",
    "make_session",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused even with allow_private: credentials live there, never a voice app.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UrlForbidden(Exception):
    """The URL may not be fetched; the message names the URL and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HostUnresolvable(UrlForbidden):
    """The host did not resolve. A subclass so callers that only know UrlForbidden stay safe;
    callers that care (the voice app client) report it as unreachable instead."""


class ForbiddenAddressError(OSError):
    """Raised by GuardedResolver when every address of a host is forbidden.

    An OSError because aiohttp wraps resolver OSErrors in ClientConnectorDNSError (as `os_error`).
    """


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def forbidden_reason(ip: IPAddress | str, *, allow_private: bool) -> str | None:
    """Why connecting to `ip` is forbidden, or None when it is allowed."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if ip in _METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_v4(ip)
        if v4 is not None:
            inner = forbidden_reason(v4, allow_private=allow_private)
            return f"{ip} embeds {inner}" if inner else None
    if allow_private:
        return None
    checks = (
        (ip.is_loopback, "loopback"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.version == 4 and ip in _CGNAT, "carrier-grade NAT (100.64.0.0/10)"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (not ip.is_global, "not globally routable"),
    )
    for hit, what in checks:
        if hit:
            return f"{ip} is {what}"
    return None


def _is_metadata_host(host: str) -> bool:
    return host.rstrip(".").lower() in _METADATA_HOSTS


def _literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


async def check_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """Raise UrlForbidden unless `url` is safe to fetch; resolves the host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlForbidden(f"{url!r}: malformed URL ({exc})") from None
    allowed = ("https", "http") if allow_http else ("https",)
    if parts.scheme.lower() not in allowed:
        need = "http or https" if allow_http else "https"
        raise UrlForbidden(f"{url!r}: scheme {parts.scheme or '(none)'!r} not allowed, {need} only")
    if "@" in parts.netloc:
        raise UrlForbidden(f"{url!r}: user:password@ in URLs is not allowed")
    host = parts.hostname
    if not host:
        raise UrlForbidden(f"{url!r}: no host")
    if _is_metadata_host(host):
        raise UrlForbidden(f"{url!r}: {host} is a cloud metadata host")

    literal = _literal_ip(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        if port is None:
            port = 443 if parts.scheme.lower() == "https" else 80
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise HostUnresolvable(f"{url!r}: cannot resolve {host} ({exc})") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not addresses:
            raise HostUnresolvable(f"{url!r}: {host} has no addresses")
    for ip in addresses:
        why = forbidden_reason(ip, allow_private=allow_private)
        if why and literal is not None:
            raise UrlForbidden(f"{url!r}: {why}")
        if why:
            # Every address must pass: the connector may pick any of them.
            raise UrlForbidden(f"{url!r}: {host} resolves to a forbidden address: {why}")


class GuardedResolver(AbstractResolver):
    """Wraps another resolver and drops forbidden addresses (DNS rebinding backstop)."""

    def __init__(self, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self._allow_private = allow_private
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if _is_metadata_host(host):
            raise ForbiddenAddressError(f"{host} is a cloud metadata host")
        results = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        reasons: list[str] = []
        for r in results:
            why = forbidden_reason(r["host"], allow_private=self._allow_private)
            if why is None:
                kept.append(r)
            else:
                reasons.append(why)
        if not kept:
            raise ForbiddenAddressError(
                f"{host}: no permitted address ({'; '.join(reasons) or 'none resolved'})"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _check_literal_host(url: URL, what: str, allow_private: bool) -> None:
    """UrlForbidden when `url`'s host is a metadata host or a forbidden IP literal."""
    host = url.host or ""
    if _is_metadata_host(host):
        raise UrlForbidden(f"{what}{str(url)!r}: {host} is a cloud metadata host")
    ip = _literal_ip(host)
    if ip is not None:
        why = forbidden_reason(ip, allow_private=allow_private)
        if why:
            raise UrlForbidden(f"{what}{str(url)!r}: {why}")


def _literal_host_hook(allow_private: bool) -> aiohttp.TraceConfig:
    # aiohttp connects to IP-literal hosts without asking the resolver, so check them here.
    async def on_request_start(
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        _check_literal_host(params.url, "", allow_private)

    # A redirect (a WebSocket upgrade follows them: ws_connect has no allow_redirects) goes
    # to an IP literal without the resolver, too.
    async def on_request_redirect(
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestRedirectParams,
    ) -> None:
        location = params.response.headers.get("Location", "")
        target = params.url.join(URL(location)) if location else params.url
        _check_literal_host(target, "redirect to ", allow_private)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    trace.on_request_redirect.append(on_request_redirect)
    return trace


def make_session(
    allow_private: bool,
    *,
    timeout: aiohttp.ClientTimeout | None = None,
    limit: int = 100,
    **kwargs: Any,
) -> aiohttp.ClientSession:
    """A ClientSession that cannot connect to forbidden addresses. Call inside a running loop.

    Still call `check_url` first (scheme, userinfo, clear error messages); this is the backstop.
    Proxies from the environment are ignored (trust_env=False): a proxy would do its own DNS.
    """
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private), limit=limit)
    trace_configs = [*(kwargs.pop("trace_configs", None) or []), _literal_host_hook(allow_private)]
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout or aiohttp.ClientTimeout(total=30),
        trace_configs=trace_configs,
        trust_env=False,
        **kwargs,
    )
