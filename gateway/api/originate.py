"""The body of `POST /v1/calls` (and `/v1/calls/originate`, the quickstart's path): its model,
every check the API can make before a call is placed, and the `OutboundCall`s it becomes.

Decisions (README "Calls API"):
- Unknown fields are ignored (the SDK adds fields across versions) and named back in the
  response's `ignored_fields`, so a misspelt one (`voice_callback_uri`) is visible.
- `to` is a string or a list of 1..MAX_DESTINATIONS numbers, each normalised like inbound
  Request-URIs (E.164 or national forms); a duplicate after normalisation is refused (it would
  ring the same phone twice). A list makes one call per destination.
- `call_id` (the control plane's own id) only with a single destination; each call of a list
  gets a generated id.
- Which document runs on answer (`voice_callback_url`, `actions`, `control: "mcp"`, or the
  `from` number's own voice_callback_url) is the node's to decide: it knows the numbers.
- The MCP fields (`hold_audio_url`, `control_timeout_ms`, `opening_actions`,
  `fallback_actions`) are refused without `control: "mcp"`: they would silently do nothing.
- URLs: shape only here (absolute http(s), a host, no credentials, http:// only with
  `callbacks.allow_http`); the SSRF policy applies when they are fetched.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from config.settings import Settings
from dsl.document import parse_document
from dsl.errors import DocumentError
from dsl.phone import InvalidNumber, parse_e164
from gateway.calls.control import OutboundCall
from gateway.events.envelope import uuid7

__all__ = [
    "MAX_CLIENT_REQUEST_ID",
    "MAX_DESTINATIONS",
    "BodyError",
    "BodyIssue",
    "CreateCallBody",
    "CreatePlan",
    "check_actions",
    "check_url",
    "parse_create",
]

MAX_DESTINATIONS = 50  # like a document's 50 actions: one request, a bounded burst of INVITEs
MAX_CLIENT_REQUEST_ID = 5000  # the SDK's limit
MAX_URL = 2048
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # goes into /v1/calls/{id}
_RESERVED_PREFIXES = ("mcp:", "broadcast:")  # the platform's own correlation labels
_FORBIDDEN_CHARS = {",": "a comma", "{": "a brace", "}": "a brace", '"': "a quote", "'": "a quote"}


@dataclass(frozen=True)
class BodyIssue:
    path: str  # e.g. "to[1]", "actions[0].say.text", "client_request_id"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class BodyError(Exception):
    """The request is invalid (422 validation.bad_request); every issue names its field."""

    def __init__(self, issues: list[BodyIssue]) -> None:
        super().__init__("; ".join(map(str, issues)))
        self.issues = issues

    def details(self) -> list[dict[str, str]]:
        return [{"path": i.path, "message": i.message} for i in self.issues]


class CreateCallBody(BaseModel):
    """What a create request may carry. `to` and the action lists are typed loosely here and
    checked by `parse_create`, so their errors name the list item (`to[1]`, `actions[0]...`)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    # The SDK's fields
    from_: str = Field(alias="from", min_length=1)
    to: Any = Field(description="an E.164 or national number, or a list of them")
    caller_id: str | None = None
    voice_callback_url: str | None = None
    voice_callback_method: Literal["POST", "GET"] = "POST"
    client_request_id: str | None = None
    control: Literal["mcp"] | None = None
    hold_audio_url: str | None = None
    control_timeout_ms: int | None = Field(
        default=None, ge=500, le=120_000, description="default 10000 with control: mcp"
    )
    fallback_actions: Any = None
    opening_actions: Any = None
    # What a gateway needs besides
    call_id: str | None = None
    session_id: str | None = None
    events_url: str | None = None
    webhook_secret: SecretStr | None = Field(default=None, min_length=1, max_length=512)
    timeout: float | None = Field(
        default=None, gt=0, le=600, description="ring seconds; default outbound.ring_timeout_s"
    )
    time_limit: float | None = Field(default=None, gt=0, le=86_400, description="call seconds")
    actions: Any = None


@dataclass(frozen=True)
class CreatePlan:
    calls: list[OutboundCall]
    to_is_list: bool  # the answer lists every call under `calls`
    ignored_fields: list[str]


DEFAULT_CONTROL_TIMEOUT_MS = 10_000


def check_url(value: Any, path: str, settings: Settings) -> list[BodyIssue]:
    if not isinstance(value, str):
        return [BodyIssue(path, "expected a URL string")]
    if len(value) > MAX_URL:
        return [BodyIssue(path, f"must be at most {MAX_URL} characters")]
    if any(c.isspace() or unicodedata.category(c) == "Cc" for c in value):
        return [BodyIssue(path, "must not contain whitespace or control characters")]
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return [BodyIssue(path, f"not a valid URL ({exc})")]
    if parts.scheme not in ("http", "https"):
        return [BodyIssue(path, "must be an absolute http:// or https:// URL")]
    if not parts.hostname:
        return [BodyIssue(path, "URL has no host")]
    if parts.username is not None or parts.password is not None:
        return [BodyIssue(path, "URL must not carry user:password@")]
    if parts.scheme == "http" and not settings.callbacks.allow_http:
        return [BodyIssue(path, "http:// URLs need callbacks.allow_http = true; use https://")]
    return []


def check_actions(value: Any, path: str) -> list[BodyIssue]:
    """A list of actions (a document's `actions`), validated whole by the dsl; paths are
    re-rooted at `path` (`opening_actions[0].say.text`)."""
    if not isinstance(value, list):
        return [BodyIssue(path, 'expected a list of actions, e.g. [{"say": {"text": "Hi"}}]')]
    if not value:
        return [BodyIssue(path, "must have at least one action")]
    try:
        parse_document({"actions": value})
    except DocumentError as err:
        return [
            BodyIssue(path + e.path.removeprefix("actions") if e.path else path, e.message)
            for e in err.errors
        ]
    return []


def check_client_request_id(value: str, path: str = "client_request_id") -> list[BodyIssue]:
    if not value:
        return [BodyIssue(path, "must not be empty")]
    if len(value) > MAX_CLIENT_REQUEST_ID:
        return [
            BodyIssue(path, f"{len(value)} characters; at most {MAX_CLIENT_REQUEST_ID} allowed")
        ]
    for prefix in _RESERVED_PREFIXES:
        if value.startswith(prefix):
            return [BodyIssue(path, f"must not start with {prefix!r} (reserved)")]
    for i, c in enumerate(value):
        if c.isspace():
            what = "whitespace"
        elif unicodedata.category(c) == "Cc":
            what = "a control character"
        elif c in _FORBIDDEN_CHARS:
            what = _FORBIDDEN_CHARS[c]
        else:
            continue
        return [
            BodyIssue(
                path,
                f"contains {what} at position {i}; whitespace, commas, braces, quotes and"
                " control characters are not allowed",
            )
        ]
    return []


def _check_id(value: str, path: str) -> list[BodyIssue]:
    if not _ID_RE.match(value):
        return [BodyIssue(path, "expected 1-128 characters: letters, digits, '.', '_', ':' or '-'")]
    return []


def _number(value: Any, path: str) -> tuple[str | None, list[BodyIssue]]:
    if not isinstance(value, str):
        return None, [BodyIssue(path, "expected a phone number string, e.g. +254722000001")]
    try:
        if len(value) > 64:
            raise InvalidNumber("too long")
        return parse_e164(value), []
    except InvalidNumber as e:
        return None, [
            BodyIssue(
                path,
                f"{value[:64]!r} is not a phone number ({e.reason}): expected E.164 like"
                " +254722000001 or a national form like 0722000001",
            )
        ]


def pydantic_issues(err: ValidationError) -> list[BodyIssue]:
    out = []
    for e in err.errors(include_url=False):
        path = ".".join(str(x) for x in e["loc"])
        kind, ctx = e["type"], e.get("ctx", {})
        if kind == "missing":
            message = "required"
        elif kind in ("string_type",):
            message = "expected a string"
        elif kind.startswith(("int_", "float_")):
            message = "expected a number" if kind.startswith("float") else "expected an integer"
        elif kind == "literal_error":
            message = "expected " + str(ctx.get("expected", "")).replace("'", '"')
        elif kind == "string_too_short":
            message = "must not be empty"
        elif kind == "string_too_long":
            message = f"must be at most {ctx.get('max_length')} characters"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            sign = {
                "greater_than": ">",
                "greater_than_equal": ">=",
                "less_than": "<",
                "less_than_equal": "<=",
            }[kind]
            bound = next(iter(ctx.values()), "")
            message = f"must be {sign} {bound}"
        elif kind == "model_type" or kind == "dict_type":
            message = "expected a JSON object"
        else:
            message = str(e["msg"]).lower()
        out.append(BodyIssue(path, message))
    return out


def parse_create(raw: Any, settings: Settings) -> CreatePlan:
    """Validate a create body (parsed JSON) whole; raise BodyError listing every problem."""
    if not isinstance(raw, dict):
        raise BodyError([BodyIssue("", "expected a JSON object body")])
    try:
        body = CreateCallBody.model_validate(raw)
    except ValidationError as err:
        raise BodyError(pydantic_issues(err)) from None
    issues: list[BodyIssue] = []

    from_e164, bad = _number(body.from_, "from")
    issues += bad
    caller_id = None
    if body.caller_id is not None:
        caller_id, bad = _number(body.caller_id, "caller_id")
        issues += bad

    to_is_list = isinstance(body.to, list)
    raw_to: list[Any] = body.to if isinstance(body.to, list) else [body.to]
    if to_is_list and not raw_to:
        issues.append(BodyIssue("to", "must list at least one number"))
    elif len(raw_to) > MAX_DESTINATIONS:
        issues.append(
            BodyIssue("to", f"{len(raw_to)} numbers; at most {MAX_DESTINATIONS} per request")
        )
    destinations: list[str] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw_to[:MAX_DESTINATIONS]):
        path = f"to[{i}]" if to_is_list else "to"
        e164, bad = _number(item, path)
        issues += bad
        if e164 is None:
            continue
        if e164 in seen:
            issues.append(BodyIssue(path, f"{e164} is already to[{seen[e164]}]"))
            continue
        seen[e164] = i
        destinations.append(e164)

    if body.call_id is not None:
        issues += _check_id(body.call_id, "call_id")
        if len(raw_to) > 1:
            issues.append(
                BodyIssue(
                    "call_id",
                    "only with a single destination; each call of a `to` list gets its own id",
                )
            )
    if body.session_id is not None:
        issues += _check_id(body.session_id, "session_id")
    if body.client_request_id is not None:
        issues += check_client_request_id(body.client_request_id)
    for key in ("voice_callback_url", "events_url", "hold_audio_url"):
        value = getattr(body, key)
        if value is not None:
            issues += check_url(value, key, settings)
    for key in ("actions", "opening_actions", "fallback_actions"):
        value = getattr(body, key)
        if value is not None:
            issues += check_actions(value, key)
    if body.actions is not None and body.voice_callback_url is not None:
        issues.append(BodyIssue("actions", "give actions or voice_callback_url, not both"))
    if body.control == "mcp":
        if settings.control_plane.control_url is None:
            issues.append(
                BodyIssue("control", 'control: "mcp" needs [control_plane] control_url set')
            )
    else:
        for key in ("hold_audio_url", "control_timeout_ms", "opening_actions", "fallback_actions"):
            if getattr(body, key) is not None:
                issues.append(BodyIssue(key, 'only with control: "mcp"'))
    if issues:
        raise BodyError(issues)

    assert from_e164 is not None
    secret = body.webhook_secret.get_secret_value() if body.webhook_secret else None
    mcp = body.control == "mcp"
    ring_s = body.timeout if body.timeout is not None else settings.outbound.ring_timeout_s
    calls = [
        OutboundCall(
            call_id=body.call_id if body.call_id is not None else uuid7(),
            from_=from_e164,
            to=to,
            caller_id=caller_id,
            voice_callback_url=body.voice_callback_url,
            voice_callback_method=body.voice_callback_method,
            events_url=body.events_url,
            webhook_secret=secret,
            client_request_id=body.client_request_id,
            session_id=body.session_id,
            timeout_s=ring_s,
            time_limit_s=body.time_limit,
            actions=body.actions,
            control=body.control,
            hold_audio_url=body.hold_audio_url,
            control_timeout_ms=(body.control_timeout_ms or DEFAULT_CONTROL_TIMEOUT_MS)
            if mcp
            else None,
            opening_actions=body.opening_actions,
            fallback_actions=body.fallback_actions,
        )
        for to in destinations
    ]
    return CreatePlan(calls, to_is_list, sorted(body.model_extra or {}))
