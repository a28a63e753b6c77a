"""VoiceAppClient against a real aiohttp voice app on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dsl.context import VoiceAppError
from gateway.urlguard import ForbiddenAddressError, UrlForbidden, make_session
from gateway.voice_app import VoiceAppClient, resolve_relative
from tests.seed_receiver import verify_signature

SECRET = "whsec_test_secret"
DOC = {"actions": [{"say": {"text": "hi"}}, {"hangup": {}}]}




@dataclass
class Seen:
    method: str
    content_type: str
    raw: bytes
    form: dict[str, str]
    query: dict[str, str]
    signature: str
    raw_query: str = ""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    base: str = ""
    seen: list[Seen] = field(default_factory=list)
    routes: dict[str, Handler] = field(default_factory=dict)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        form: dict[str, str] = {}
        if request.method == "POST" and request.content_type.endswith("urlencoded"):
            # What an express.urlencoded-style app does: parse the form body.
            form = {k: str(v) for k, v in (await request.post()).items()}
        srv.seen.append(
            Seen(
                method=request.method,
                content_type=request.content_type,
                raw=raw,
                form=form,
                query=dict(request.query),
                signature=request.headers.get("X-Sautikit-Signature", ""),
                raw_query=request.rel_url.raw_query_string,
            )
        )
        handler = srv.routes.get(request.path)
        if handler is None:
            return web.json_response(DOC)
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield srv
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = make_session(allow_private=True)
    yield s
    await s.close()


def call_fields() -> dict[str, str]:
    return {
        "callId": "call_123",
        "direction": "inbound",
        "from": "+254722000001",
        "to": "+254700000001",
        "numberId": "num_1",
        "workspaceId": "ws_1",
        "callStatus": "ringing",
    }


def client(session: aiohttp.ClientSession, fields: dict[str, str], **kw: Any) -> VoiceAppClient:
    opts: dict[str, Any] = {"allow_http": True, "allow_private": True, "timeout_s": 5.0}
    opts.update(kw)
    return VoiceAppClient(session, fields, SECRET, **opts)


async def test_form_post_signed_and_parsed(server: Server, session: aiohttp.ClientSession) -> None:
    fields = call_fields()
    app = client(session, fields)
    doc = await app.fetch(f"{server.base}/voice", "POST", {"Digits": "42#"})
    assert doc.body == DOC and doc.url == f"{server.base}/voice"
    seen = server.seen[0]
    assert seen.content_type == "application/x-www-form-urlencoded"
    assert seen.form == {**fields, "Digits": "42#"}
    verify_signature(seen.raw, seen.signature, SECRET)
    with pytest.raises(ValueError, match="mismatch"):
        verify_signature(seen.raw + b"x", seen.signature, SECRET)

    # The caller mutates its dict; the client must send the current status.
    fields["callStatus"] = "in-progress"
    await app.fetch(f"{server.base}/voice", "post")
    assert server.seen[1].form["callStatus"] == "in-progress"
    assert "Digits" not in server.seen[1].form


async def test_extra_cannot_override_call_identity(
    server: Server, session: aiohttp.ClientSession
) -> None:
    await client(session, call_fields()).fetch(
        f"{server.base}/v", "POST", {"from": "+1999", "Foo": "bar"}
    )
    assert server.seen[0].form["from"] == "+254722000001"
    assert server.seen[0].form["Foo"] == "bar"


async def test_json_body(server: Server, session: aiohttp.ClientSession) -> None:
    fields = call_fields()
    await client(session, fields, body_format="json").fetch(
        f"{server.base}/voice", "POST", {"Digits": "1"}
    )
    seen = server.seen[0]
    assert seen.content_type == "application/json"
    assert json.loads(seen.raw) == {**fields, "Digits": "1"}
    verify_signature(seen.raw, seen.signature, SECRET)


async def test_get_sends_query_and_signs_the_raw_query(
    server: Server, session: aiohttp.ClientSession
) -> None:
    fields = call_fields()
    url = f"{server.base}/voice?app=ivr&step=2"
    doc = await client(session, fields).fetch(url, "GET", {"Digits": "9"})
    assert doc.url == url
    seen = server.seen[0]
    assert seen.method == "GET" and seen.raw == b""
    assert seen.query == {"app": "ivr", "step": "2", **fields, "Digits": "9"}
    # GET: the HMAC message is the raw query string + "." + t, so the call state is covered.
    verify_signature(seen.raw_query.encode(), seen.signature, SECRET)
    tampered = seen.raw_query.replace("Digits=9", "Digits=1")
    with pytest.raises(ValueError, match="mismatch"):
        verify_signature(tampered.encode(), seen.signature, SECRET)
    with pytest.raises(ValueError, match="mismatch"):
        verify_signature(b"", seen.signature, SECRET)


async def test_any_content_type_if_body_is_json(
    server: Server, session: aiohttp.ClientSession
) -> None:
    async def text_plain(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(DOC), content_type="text/plain")

    server.routes["/plain"] = text_plain
    doc = await client(session, call_fields()).fetch(f"{server.base}/plain", "POST")
    assert doc.body == DOC


async def fetch_error(app: VoiceAppClient, url: str, method: str = "POST") -> VoiceAppError:
    with pytest.raises(VoiceAppError) as exc:
        await app.fetch(url, method)
    return exc.value


async def test_http_error_status(server: Server, session: aiohttp.ClientSession) -> None:
    async def boom(request: web.Request) -> web.Response:
        return web.Response(status=500, text="oops")

    server.routes["/boom"] = boom
    err = await fetch_error(client(session, call_fields()), f"{server.base}/boom")
    assert err.code == "callback_http_status" and "500" in err.message


async def test_redirect_not_followed(server: Server, session: aiohttp.ClientSession) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    server.routes["/r"] = redirect
    err = await fetch_error(client(session, call_fields()), f"{server.base}/r")
    assert err.code == "callback_http_status" and "302" in err.message
    assert [s for s in server.seen if s.method == "POST"] and len(server.seen) == 1


async def test_timeout(server: Server, session: aiohttp.ClientSession) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.json_response(DOC)

    server.routes["/slow"] = slow
    started = time.monotonic()
    err = await fetch_error(client(session, call_fields(), timeout_s=0.5), f"{server.base}/slow")
    assert err.code == "callback_timeout"
    assert time.monotonic() - started < 2


async def test_timeout_while_streaming_body(server: Server, session: aiohttp.ClientSession) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"actions": [')
        await asyncio.sleep(1.5)
        return resp

    server.routes["/trickle"] = trickle
    err = await fetch_error(client(session, call_fields(), timeout_s=0.5), f"{server.base}/trickle")
    assert err.code == "callback_timeout"


async def test_not_json(server: Server, session: aiohttp.ClientSession) -> None:
    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>hi</html>", content_type="text/html")

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    server.routes["/html"] = html
    server.routes["/empty"] = empty
    app = client(session, call_fields())
    assert (await fetch_error(app, f"{server.base}/html")).code == "callback_not_json"
    assert (await fetch_error(app, f"{server.base}/empty")).code == "callback_not_json"


async def test_document_too_large(server: Server, session: aiohttp.ClientSession) -> None:
    big = json.dumps({"actions": [{"say": {"text": "x" * 200_000}}]}).encode()

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    async def chunked(request: web.Request) -> web.StreamResponse:
        # No Content-Length: the limit must hold while streaming.
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(big), 4096):
            await resp.write(big[i : i + 4096])
        await resp.write_eof()
        return resp

    server.routes["/sized"] = sized
    server.routes["/chunked"] = chunked
    app = client(session, call_fields(), max_document_bytes=4096)
    for path in ("/sized", "/chunked"):
        err = await fetch_error(app, f"{server.base}{path}")
        assert err.code == "document_too_large", path
    # Exactly at the limit is fine.
    exact = json.dumps({"a": "y" * (4096 - 9)}).encode()
    assert len(exact) == 4096

    async def at_limit(request: web.Request) -> web.Response:
        return web.Response(body=exact)

    server.routes["/exact"] = at_limit
    assert (await app.fetch(f"{server.base}/exact", "POST")).body == json.loads(exact)


async def test_private_url_forbidden(server: Server, session: aiohttp.ClientSession) -> None:
    app = client(session, call_fields(), allow_private=False)
    err = await fetch_error(app, f"{server.base}/voice")
    assert err.code == "url_forbidden" and "loopback" in err.message
    assert server.seen == []


async def test_http_forbidden_without_allow_http(
    server: Server, session: aiohttp.ClientSession
) -> None:
    app = client(session, call_fields(), allow_http=False)
    assert (await fetch_error(app, f"{server.base}/voice")).code == "url_forbidden"
    assert server.seen == []


async def test_bad_method(server: Server, session: aiohttp.ClientSession) -> None:
    err = await fetch_error(client(session, call_fields()), f"{server.base}/v", "DELETE")
    assert err.code == "document_invalid"


async def test_unreachable(session: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = await fetch_error(client(session, call_fields()), f"http://127.0.0.1:{port}/v")
    assert err.code == "callback_unreachable"
    err = await fetch_error(client(session, call_fields()), "http://no-such-host.invalid/v")
    assert err.code == "callback_unreachable"


async def test_guarded_session_is_a_backstop(server: Server) -> None:
    """Without check_url, a guarded session still cannot reach loopback (rebinding defence)."""
    async with make_session(allow_private=False) as guarded:
        with pytest.raises(UrlForbidden):
            await guarded.get(f"{server.base}/voice")  # IP literal: request hook
        port = server.base.rsplit(":", 1)[1]
        with pytest.raises(aiohttp.ClientConnectorDNSError) as exc:
            await guarded.get(f"http://localhost:{port}/voice")  # name: resolver
        assert isinstance(exc.value.os_error, ForbiddenAddressError)
    assert server.seen == []


def test_resolve_relative() -> None:
    assert resolve_relative("https://a.example/ivr/start", "next") == "https://a.example/ivr/next"
    assert resolve_relative("https://a.example/ivr/start", "/x") == "https://a.example/x"
    assert resolve_relative("https://a.example/", "https://b.example/y") == "https://b.example/y"


def test_repr_hides_secret() -> None:
    app = VoiceAppClient(None, call_fields(), SECRET)  # type: ignore[arg-type]
    assert SECRET not in repr(app)
