"""The product's error envelope, `{"error": {"code", "message", "request_id", ...}}`, for every
error. Extra fields (e.g. `retry_after_seconds` on a 503, `errors` listing each invalid field)
sit beside the three the SDK parses."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

# Codes the node raises too (as ControlError): defined once, in the contract. CALLS_CAPACITY
# (503, no worker slot or trunk capacity) is not in the catalogue; the others are.
from gateway.calls.control import CALL_EXISTS as CALLS_ALREADY_EXISTS
from gateway.calls.control import CALLS_ENDED, CALLS_NOT_FOUND, NUMBERS_NOT_FOUND
from gateway.calls.control import CAPACITY as CALLS_CAPACITY

__all__ = [
    "API_KEY_INVALID",
    "AUTH_TOKEN_INVALID",
    "CALLS_ALREADY_EXISTS",
    "CALLS_CAPACITY",
    "CALLS_ENDED",
    "CALLS_NOT_FOUND",
    "IDEMPOTENCY_CONFLICT",
    "INTERNAL_ERROR",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "NUMBERS_NOT_FOUND",
    "RECORDING_EXPIRED",
    "RECORDING_FAILED",
    "RECORDING_NOT_FOUND",
    "REQUEST_ID_KEY",
    "VALIDATION_BAD_REQUEST",
    "VALIDATION_INVALID_CURSOR",
    "ApiError",
    "error_middleware",
    "error_response",
    "request_id",
]

log = logging.getLogger(__name__)

# Codes from the product's error catalogue.
API_KEY_INVALID = "api_key.invalid"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
VALIDATION_BAD_REQUEST = "validation.bad_request"
VALIDATION_INVALID_CURSOR = "validation.invalid_cursor"
INTERNAL_ERROR = "internal_error"
AUTH_TOKEN_INVALID = "auth.token_invalid"  # a recording link's signature does not match
IDEMPOTENCY_CONFLICT = "idempotency.conflict"
RECORDING_NOT_FOUND = "calls.recording_not_found"
RECORDING_EXPIRED = "calls.recording_expired"
RECORDING_FAILED = "calls.recording_failed"

# web.RequestKey (aiohttp >= 3.13) avoids its NotAppKeyWarning; a plain str key before that.
REQUEST_ID_KEY: Any = (
    web.RequestKey("sautikit_request_id", str)
    if hasattr(web, "RequestKey")
    else "sautikit.request_id"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """Raise from a handler to answer with the error envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def request_id(request: web.Request) -> str:
    rid = request.get(REQUEST_ID_KEY)
    if not isinstance(rid, str):
        rid = f"req_{secrets.token_hex(12)}"
        request[REQUEST_ID_KEY] = rid
    return rid


def error_response(
    request: web.Request,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    """The envelope; `extra` fields go inside `error`, never replacing the three standard ones."""
    rid = request_id(request)
    error: dict[str, Any] = dict(extra or {})
    error |= {"code": code, "message": message, "request_id": rid}
    resp = web.json_response(
        {"error": error},
        status=status,
        headers=headers,
    )
    resp.headers["X-Request-Id"] = rid
    return resp


# aiohttp's own HTTP exceptions (router 404/405, body too large, ...) → catalogue codes.
_STATUS_CODES = {
    400: VALIDATION_BAD_REQUEST,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    413: VALIDATION_BAD_REQUEST,
    415: VALIDATION_BAD_REQUEST,
    422: VALIDATION_BAD_REQUEST,
}
_KEEP_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id(request)
    try:
        resp = await handler(request)
    except ApiError as exc:
        return error_response(request, exc.status, exc.code, exc.message, exc.headers, exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects etc. pass through untouched
        code = _STATUS_CODES.get(exc.status, INTERNAL_ERROR if exc.status >= 500 else NOT_FOUND)
        if exc.status == 404:
            message = f"no route for {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed for {request.path}"
        else:
            message = exc.reason
        headers = {k: exc.headers[k] for k in _KEEP_HEADERS if k in exc.headers}
        return error_response(request, exc.status, code, message, headers)
    except Exception:
        log.exception("unhandled error serving %s %s [%s]", request.method, request.path, rid)
        return error_response(request, 500, INTERNAL_ERROR, "internal error")
    if not resp.prepared:
        resp.headers["X-Request-Id"] = rid
    return resp
