"""Client for a number's voice app: POSTs (or GETs) signed call state, returns the JSON document."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urljoin

import aiohttp
from yarl import URL

from config.settings import CallbacksSettings
from dsl.context import FetchedDocument, VoiceAppError
from dsl.document import check_depth
from dsl.errors import DocumentError
from gateway.events.signing import SIGNATURE_HEADER, sign
from gateway.urlguard import ForbiddenAddressError, HostUnresolvable, UrlForbidden, check_url

__all__ = ["VoiceAppClient", "get_query", "resolve_relative"]

log = logging.getLogger(__name__)

USER_AGENT = "Sautikit-Gateway/0.1"


def get_query(url: str, fields: Mapping[str, str]) -> str:
    """The raw query string of a GET callback: the URL's own parameters (those the call state
    does not name), then the call state, form-encoded."""
    own = [(k, v) for k, v in parse_qsl(URL(url).raw_query_string, keep_blank_values=True)]
    return urlencode([(k, v) for k, v in own if k not in fields] + list(fields.items()))


def resolve_relative(base: str, ref: str) -> str:
    """Resolve a document's (possibly relative) URL against the URL that produced it."""
    return urljoin(base, ref)


class VoiceAppClient:
    """Implements `dsl.context.VoiceApp` for one call.

    `call_fields` is kept by reference: the caller updates e.g. `callStatus` in place and every
    later fetch sends the current values.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        call_fields: Mapping[str, str],
        secret: str,
        body_format: Literal["form", "json"] = "form",
        timeout_s: float = 10.0,
        allow_http: bool = False,
        allow_private: bool = False,
        max_document_bytes: int = 65536,
    ) -> None:
        self._session = session
        self._call_fields = call_fields
        self._secret = secret
        self._body_format = body_format
        self._timeout_s = timeout_s
        self._allow_http = allow_http
        self._allow_private = allow_private
        self._max_bytes = max_document_bytes

    @classmethod
    def from_settings(
        cls,
        session: aiohttp.ClientSession,
        call_fields: Mapping[str, str],
        secret: str,
        body_format: Literal["form", "json"],
        callbacks: CallbacksSettings,
    ) -> VoiceAppClient:
        return cls(
            session,
            call_fields,
            secret,
            body_format,
            timeout_s=callbacks.timeout_s,
            allow_http=callbacks.allow_http,
            allow_private=callbacks.allow_private,
            max_document_bytes=callbacks.max_document_bytes,
        )

    def __repr__(self) -> str:  # never show the secret
        return f"VoiceAppClient(callId={self._call_fields.get('callId')!r})"

    async def fetch(
        self, url: str, method: str, extra: Mapping[str, str] | None = None
    ) -> FetchedDocument:
        method = method.upper()
        if method not in ("GET", "POST"):
            raise VoiceAppError("document_invalid", f"unsupported callback method {method!r}")
        # Call identity wins over `extra`, so a document's params cannot spoof callId/from/to.
        fields: dict[str, str] = {**(extra or {}), **self._call_fields}
        started = time.monotonic()
        try:
            # One deadline over DNS check, connect and reading the whole document.
            async with asyncio.timeout(self._timeout_s):
                body = await self._fetch(url, method, fields)
        except TimeoutError:
            raise VoiceAppError(
                "callback_timeout", f"no document from {url} within {self._timeout_s:g}s"
            ) from None
        log.debug(
            "voice app %s %s -> %d bytes in %.0f ms",
            method,
            url,
            len(body),
            (time.monotonic() - started) * 1000,
        )
        try:
            check_depth(body)  # before json.loads, which recurses
        except DocumentError as err:
            raise VoiceAppError("document_invalid", str(err)) from None
        try:
            doc: Any = json.loads(body)
        except ValueError:
            raise VoiceAppError("callback_not_json", f"reply from {url} is not JSON") from None
        return FetchedDocument(body=doc, url=url)

    async def _fetch(self, url: str, method: str, fields: dict[str, str]) -> bytes:
        try:
            await check_url(url, allow_http=self._allow_http, allow_private=self._allow_private)
        except HostUnresolvable as exc:
            raise VoiceAppError("callback_unreachable", exc.reason) from None
        except UrlForbidden as exc:
            raise VoiceAppError("url_forbidden", exc.reason) from None

        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        target: str | URL = url
        if method == "GET":
            # The call state travels in the query, so the query is what gets signed (README:
            # raw query string + "." + t); sent exactly as signed (encoded=True: no re-quoting).
            query = get_query(url, fields)
            body = b""
            target = URL(f"{URL(url).with_query(None).with_fragment(None)}?{query}", encoded=True)
            headers[SIGNATURE_HEADER] = sign(self._secret, query.encode())
        elif self._body_format == "json":
            body = json.dumps(fields, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        else:
            # Form-encoded: the SDK's examples parse it with express.urlencoded (req.body.Digits).
            body = urlencode(fields).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if method == "POST":
            headers[SIGNATURE_HEADER] = sign(self._secret, body)

        try:
            async with self._session.request(
                method,
                target,
                data=body if method == "POST" else None,
                headers=headers,
                allow_redirects=False,  # a redirect could lead anywhere; the DSL has `redirect`
            ) as resp:
                if not 200 <= resp.status < 300:
                    where = ""
                    if 300 <= resp.status < 400:
                        where = f" (redirect to {resp.headers.get('Location')!r} not followed)"
                    raise VoiceAppError(
                        "callback_http_status", f"HTTP {resp.status} from {url}{where}"
                    )
                return await self._read_limited(resp, url)
        except UrlForbidden as exc:  # the guarded session's IP-literal hook
            raise VoiceAppError("url_forbidden", exc.reason) from None
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, ForbiddenAddressError):
                raise VoiceAppError("url_forbidden", f"{url}: {exc.os_error}") from None
            raise VoiceAppError("callback_unreachable", f"{url}: {exc}") from None
        except TimeoutError:
            # aiohttp's own socket timeouts; before OSError, of which TimeoutError is a subclass.
            raise VoiceAppError("callback_timeout", f"{url}: timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise VoiceAppError(
                "callback_unreachable", f"{url}: {type(exc).__name__}: {exc}"
            ) from None

    async def post_json(self, url: str, payload: Mapping[str, Any]) -> None:
        """A signed JSON notification (stream status): the reply is not read. Raises
        VoiceAppError like `fetch`."""
        try:
            await check_url(url, allow_http=self._allow_http, allow_private=self._allow_private)
        except HostUnresolvable as exc:
            raise VoiceAppError("callback_unreachable", exc.reason) from None
        except UrlForbidden as exc:
            raise VoiceAppError("url_forbidden", exc.reason) from None
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   SIGNATURE_HEADER: sign(self._secret, body)}
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.post(url, data=body, headers=headers,
                                              allow_redirects=False) as resp:
                    if not 200 <= resp.status < 300:
                        raise VoiceAppError("callback_http_status",
                                            f"HTTP {resp.status} from {url}")
        except TimeoutError:
            raise VoiceAppError("callback_timeout", f"{url}: timed out") from None
        except UrlForbidden as exc:
            raise VoiceAppError("url_forbidden", exc.reason) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise VoiceAppError(
                "callback_unreachable", f"{url}: {type(exc).__name__}: {exc}"
            ) from None

    async def _read_limited(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        too_large = VoiceAppError(
            "document_too_large", f"reply from {url} exceeds {self._max_bytes} bytes"
        )
        if resp.content_length is not None and resp.content_length > self._max_bytes:
            raise too_large
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(16384):
            buf += chunk
            if len(buf) > self._max_bytes:
                raise too_large  # stop reading; the connection is dropped, not drained
        return bytes(buf)
