from __future__ import annotations

import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.urlguard import (
    ForbiddenAddressError,
    GuardedResolver,
    HostUnresolvable,
    UrlForbidden,
    check_url,
    forbidden_reason,
)

FORBIDDEN_LITERALS = [
    ("127.0.0.1", "loopback"),
    ("127.10.0.1", "loopback"),
    ("[::1]", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("[fc00::1]", "private"),
    ("[fd12:3456::1]", "private"),
    ("169.254.10.10", "link-local"),
    ("[fe80::1]", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("[::]", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("[ff02::1]", "multicast"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.1", "private"),  # TEST-NET-1 (documentation)
    ("[::ffff:127.0.0.1]", "loopback"),
    ("[::ffff:10.0.0.1]", "private"),
    ("[::ffff:169.254.169.254]", "metadata"),
    ("[2002:7f00:1::]", "loopback"),  # 6to4 wrapping 127.0.0.1
    ("[64:ff9b::a00:1]", "private"),  # NAT64 wrapping 10.0.0.1
    ("169.254.169.254", "metadata"),
    ("[fd00:ec2::254]", "metadata"),
    ("100.100.100.200", "metadata"),
]


@pytest.mark.parametrize(("host", "why"), FORBIDDEN_LITERALS)
async def test_forbidden_literals(host: str, why: str) -> None:
    url = f"https://{host}/voice"
    with pytest.raises(UrlForbidden) as exc:
        await check_url(url, allow_http=False, allow_private=False)
    assert why in str(exc.value)
    assert url in str(exc.value)


@pytest.mark.parametrize("host", ["169.254.169.254", "[fd00:ec2::254]", "100.100.100.200"])
async def test_metadata_refused_even_with_allow_private(host: str) -> None:
    with pytest.raises(UrlForbidden, match="metadata"):
        await check_url(f"http://{host}/", allow_http=True, allow_private=True)


async def test_metadata_hostname_refused_without_dns() -> None:
    for host in ("metadata.google.internal", "METADATA.google.internal."):
        with pytest.raises(UrlForbidden, match="metadata"):
            await check_url(
                f"http://{host}/computeMetadata/v1/", allow_http=True, allow_private=True
            )


async def test_private_allowed_when_configured() -> None:
    await check_url("http://127.0.0.1:8080/x", allow_http=True, allow_private=True)
    await check_url("https://[::1]/x", allow_http=False, allow_private=True)
    await check_url("http://localhost:1/x", allow_http=True, allow_private=True)


async def test_public_literal_allowed() -> None:
    await check_url("https://8.8.8.8/voice", allow_http=False, allow_private=False)
    await check_url("https://[2606:4700:4700::1111]/", allow_http=False, allow_private=False)
    await check_url("https://[::ffff:8.8.8.8]/", allow_http=False, allow_private=False)


async def test_localhost_name_resolves_to_forbidden() -> None:
    with pytest.raises(UrlForbidden, match="loopback"):
        await check_url("https://localhost/x", allow_http=False, allow_private=False)


async def test_http_refused_unless_allowed() -> None:
    with pytest.raises(UrlForbidden, match="scheme 'http'"):
        await check_url("http://8.8.8.8/voice", allow_http=False, allow_private=False)
    await check_url("http://8.8.8.8/voice", allow_http=True, allow_private=False)


@pytest.mark.parametrize(
    "url", ["ftp://8.8.8.8/x", "file:///etc/passwd", "gopher://8.8.8.8/", "/relative", ""]
)
async def test_other_schemes_refused(url: str) -> None:
    with pytest.raises(UrlForbidden):
        await check_url(url, allow_http=True, allow_private=True)


@pytest.mark.parametrize(
    "url", ["https://user:pw@8.8.8.8/", "https://user@8.8.8.8/", "https://8.8.8.8@127.0.0.1/"]
)
async def test_userinfo_refused(url: str) -> None:
    with pytest.raises(UrlForbidden, match="user:password@"):
        await check_url(url, allow_http=True, allow_private=True)


async def test_malformed_port_refused() -> None:
    with pytest.raises(UrlForbidden, match="malformed"):
        await check_url("https://8.8.8.8:99999/", allow_http=False, allow_private=False)


async def test_unresolvable_is_a_distinct_subclass() -> None:
    with pytest.raises(HostUnresolvable):
        await check_url("https://does-not-exist.invalid/", allow_http=False, allow_private=False)


def test_forbidden_reason_plain() -> None:
    assert forbidden_reason("8.8.8.8", allow_private=False) is None
    assert forbidden_reason("10.0.0.1", allow_private=True) is None
    assert forbidden_reason("fe80::1%eth0", allow_private=False) is not None


class FakeResolver(AbstractResolver):
    def __init__(self, addrs: list[str]) -> None:
        self.addrs = addrs

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in self.addrs
        ]

    async def close(self) -> None:
        pass


async def test_guarded_resolver_drops_forbidden_addresses() -> None:
    # As if DNS was rebound to a private address after check_url passed.
    r = GuardedResolver(False, FakeResolver(["8.8.8.8", "10.0.0.1", "::1"]))
    assert [x["host"] for x in await r.resolve("rebind.example", 443)] == ["8.8.8.8"]
    r = GuardedResolver(False, FakeResolver(["127.0.0.1", "169.254.169.254"]))
    with pytest.raises(ForbiddenAddressError):
        await r.resolve("rebind.example", 443)
    r = GuardedResolver(True, FakeResolver(["127.0.0.1", "169.254.169.254"]))
    assert [x["host"] for x in await r.resolve("rebind.example", 443)] == ["127.0.0.1"]
    with pytest.raises(ForbiddenAddressError):
        await r.resolve("metadata.google.internal", 80)
